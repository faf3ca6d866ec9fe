//! The engine's behaviour: the L4 semantics ztunnel has always had (first half), then the L7
//! fields, conditions, actions and conversions a waypoint needs.

use std::net::IpAddr;

use ambit_proto::security as pb;
use ambit_proto::waypoint as wp;
use http::HeaderMap;

use crate::*;

fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Exact(s.into())),
    }
}

fn presence() -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Presence(())),
    }
}

fn cidr(ip: &str, len: u32) -> pb::Address {
    let ip: IpAddr = ip.parse().unwrap();
    let address = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    pb::Address {
        address,
        length: len,
    }
}

fn policy(
    ns: &str,
    name: &str,
    scope: pb::Scope,
    action: pb::Action,
    matches: Vec<pb::Match>,
) -> Policy {
    Policy::from_proto(&pb::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause { matches }],
        }],
        dry_run: false,
        ..Default::default()
    })
    .unwrap()
}

fn from(identity: Option<&str>, src: &str, dst: &str) -> ConnectionContext {
    ConnectionContext::danger_assumed_identity(
        src.parse().unwrap(),
        identity.map(|i| i.parse().unwrap()),
        dst.parse().unwrap(),
    )
}

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/legacy/sa/default";

#[test]
fn no_policies_allow_everything() {
    let store = PolicyStore::new();
    let d = store.authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:8080"));
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed: no ALLOW policy applies");
}

#[test]
fn allow_by_principal_denies_everyone_else() {
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "allow-client",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![pb::Match {
            principals: vec![exact("cluster.local/ns/demo/sa/client")],
            ..Default::default()
        }],
    ));
    let ok = store.authorize(
        "demo",
        &[],
        &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:8080"),
    );
    assert!(ok.allowed);
    assert_eq!(ok.policy(), Some("demo/allow-client"));
    let other = store.authorize("demo", &[], &from(Some(OTHER), "10.0.0.2", "10.0.1.1:8080"));
    assert!(!other.allowed);
    assert_eq!(
        other.reason,
        "denied: no ALLOW policy matched (applicable: demo/allow-client)"
    );
    let plaintext = store.authorize("demo", &[], &from(None, "10.0.0.2", "10.0.1.1:8080"));
    assert!(!plaintext.allowed, "no identity cannot match a principal");
    // Other namespaces are unaffected by a namespace-scoped policy.
    assert!(
        store
            .authorize("legacy", &[], &from(None, "10.0.0.2", "10.0.2.1:80"))
            .allowed
    );
}

#[test]
fn deny_wins_over_allow() {
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "allow-all-authenticated",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![pb::Match {
            principals: vec![presence()],
            ..Default::default()
        }],
    ));
    store.insert(policy(
        "demo",
        "deny-port-9090",
        pb::Scope::Namespace,
        pb::Action::Deny,
        vec![pb::Match {
            destination_ports: vec![9090],
            ..Default::default()
        }],
    ));
    assert!(
        store
            .authorize(
                "demo",
                &[],
                &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:8080")
            )
            .allowed
    );
    let d = store.authorize(
        "demo",
        &[],
        &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:9090"),
    );
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by DENY policy demo/deny-port-9090");
}

#[test]
fn strict_peer_authentication_shape_denies_plaintext_only() {
    // PeerAuthentication STRICT becomes DENY with not_principals: [presence].
    let mut store = PolicyStore::new();
    store.insert(policy(
        "istio-system",
        "istio_converted_static_strict",
        pb::Scope::Global,
        pb::Action::Deny,
        vec![pb::Match {
            not_principals: vec![presence()],
            ..Default::default()
        }],
    ));
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.0.0.9", "10.0.1.1:8080"))
            .allowed
    );
    assert!(
        store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.9", "10.0.1.1:8080"))
            .allowed
    );
}

#[test]
fn namespaces_service_accounts_and_not_forms() {
    let m = pb::Match {
        namespaces: vec![exact("demo")],
        not_service_accounts: vec![pb::ServiceAccountMatch {
            namespace: "demo".into(),
            service_account: "banned".into(),
        }],
        ..Default::default()
    };
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "same-ns",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![m],
    ));
    assert!(
        store
            .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    assert!(
        !store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    let banned = from(
        Some("spiffe://cluster.local/ns/demo/sa/banned"),
        "10.0.0.1",
        "10.0.1.1:80",
    );
    assert!(!store.authorize("demo", &[], &banned).allowed);

    let sa_only = pb::Match {
        service_accounts: vec![pb::ServiceAccountMatch {
            namespace: "legacy".into(),
            service_account: "default".into(),
        }],
        not_namespaces: vec![exact("demo")],
        ..Default::default()
    };
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "legacy-default",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![sa_only],
    ));
    assert!(
        store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    assert!(
        !store
            .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
}

#[test]
fn ip_blocks_and_ports() {
    let m = pb::Match {
        source_ips: vec![cidr("10.0.0.0", 24)],
        not_source_ips: vec![cidr("10.0.0.66", 32)],
        destination_ips: vec![cidr("10.0.1.1", 32)],
        not_destination_ports: vec![22],
        ..Default::default()
    };
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "lan",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![m],
    ));
    assert!(
        store
            .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.1:80"))
            .allowed
    );
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.0.0.66", "10.0.1.1:80"))
            .allowed,
        "excluded source"
    );
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.9.0.5", "10.0.1.1:80"))
            .allowed,
        "outside the block"
    );
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.2:80"))
            .allowed,
        "other destination"
    );
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.1:22"))
            .allowed,
        "excluded port"
    );
}

#[test]
fn clause_and_rule_structure() {
    // Two clauses: both must hold. Inside a clause, either match may hold.
    let auth = pb::Authorization {
        name: "two-clauses".into(),
        namespace: "demo".into(),
        scope: pb::Scope::Namespace as i32,
        action: pb::Action::Allow as i32,
        rules: vec![pb::Rule {
            clauses: vec![
                pb::Clause {
                    matches: vec![
                        pb::Match {
                            namespaces: vec![exact("demo")],
                            ..Default::default()
                        },
                        pb::Match {
                            namespaces: vec![exact("legacy")],
                            ..Default::default()
                        },
                    ],
                },
                pb::Clause {
                    matches: vec![pb::Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                },
            ],
        }],
        ..Default::default()
    };
    let mut store = PolicyStore::new();
    store.insert(Policy::from_proto(&auth).unwrap());
    assert!(
        store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    assert!(
        !store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:81"))
            .allowed
    );

    // A policy with no rules never matches: an ALLOW without rules denies everything.
    let mut store = PolicyStore::new();
    store.insert(
        Policy::from_proto(&pb::Authorization {
            name: "allow-nothing".into(),
            namespace: "demo".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Allow as i32,
            ..Default::default()
        })
        .unwrap(),
    );
    assert!(
        !store
            .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );

    // A rule with no clauses matches everything.
    let mut store = PolicyStore::new();
    store.insert(
        Policy::from_proto(&pb::Authorization {
            name: "deny-all".into(),
            namespace: "demo".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Deny as i32,
            rules: vec![pb::Rule { clauses: vec![] }],
            ..Default::default()
        })
        .unwrap(),
    );
    assert!(
        !store
            .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
}

#[test]
fn scopes_global_namespace_and_selector() {
    let mut store = PolicyStore::new();
    let only_client = || {
        vec![pb::Match {
            principals: vec![exact("cluster.local/ns/demo/sa/client")],
            ..Default::default()
        }]
    };
    store.insert(policy(
        "demo",
        "selected",
        pb::Scope::WorkloadSelector,
        pb::Action::Allow,
        only_client(),
    ));
    // Not selected by this workload: does not apply.
    assert!(
        store
            .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    // Selected: applies.
    let selected = vec!["demo/selected".to_string()];
    assert!(
        !store
            .authorize(
                "demo",
                &selected,
                &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80")
            )
            .allowed
    );
    // Unknown selected keys are skipped.
    assert!(
        store
            .authorize(
                "demo",
                &["demo/missing".to_string()],
                &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80")
            )
            .allowed
    );
    // Global applies everywhere.
    store.insert(policy(
        "istio-system",
        "mesh-deny-legacy",
        pb::Scope::Global,
        pb::Action::Deny,
        vec![pb::Match {
            namespaces: vec![exact("legacy")],
            ..Default::default()
        }],
    ));
    assert!(
        !store
            .authorize(
                "anywhere",
                &[],
                &from(Some(OTHER), "10.0.0.1", "10.0.9.1:80")
            )
            .allowed
    );
    assert!(store.remove("istio-system/mesh-deny-legacy"));
    assert!(
        store
            .authorize(
                "anywhere",
                &[],
                &from(Some(OTHER), "10.0.0.1", "10.0.9.1:80")
            )
            .allowed
    );
    assert!(!store.remove("istio-system/mesh-deny-legacy"));
}

#[test]
fn dry_run_is_reported_not_enforced() {
    let mut p = policy(
        "demo",
        "would-deny",
        pb::Scope::Namespace,
        pb::Action::Deny,
        vec![pb::Match::default()],
    );
    p.dry_run = true;
    let mut store = PolicyStore::new();
    store.insert(p);
    let d = store.authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"));
    assert!(d.allowed);
    assert_eq!(
        d.dry_run,
        vec![PolicyMatch {
            policy: "demo/would-deny".to_string(),
            action: Action::Deny,
            rule: 0,
        }]
    );
}

#[test]
fn replacing_a_policy_moves_its_scope() {
    let mut store = PolicyStore::new();
    let deny_all = || vec![pb::Match::default()];
    store.insert(policy(
        "demo",
        "p",
        pb::Scope::Namespace,
        pb::Action::Deny,
        deny_all(),
    ));
    assert!(
        !store
            .authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
    store.insert(policy(
        "demo",
        "p",
        pb::Scope::WorkloadSelector,
        pb::Action::Deny,
        deny_all(),
    ));
    assert_eq!(store.len(), 1);
    assert!(
        store
            .authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:80"))
            .allowed
    );
}

#[test]
fn invalid_resources_name_policy_and_field() {
    let bad_ip = pb::Authorization {
        name: "bad".into(),
        namespace: "demo".into(),
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    source_ips: vec![
                        cidr("10.0.0.0", 8),
                        pb::Address {
                            address: vec![1, 2, 3],
                            length: 8,
                        },
                    ],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert_eq!(
        Policy::from_proto(&bad_ip).unwrap_err().to_string(),
        "authorization policy demo/bad: rules[0].clauses[0].matches[0].source_ips[1]: address has 3 bytes, expected 4 or 16"
    );
    let bad_port = pb::Authorization {
        name: "port".into(),
        namespace: "demo".into(),
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    destination_ports: vec![70000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert_eq!(
        Policy::from_proto(&bad_port).unwrap_err().to_string(),
        "authorization policy demo/port: rules[0].clauses[0].matches[0].destination_ports[0]: port 70000 is outside 1-65535"
    );
    let bad_action = pb::Authorization {
        name: "act".into(),
        namespace: "demo".into(),
        action: 7,
        ..Default::default()
    };
    assert_eq!(
        Policy::from_proto(&bad_action).unwrap_err().to_string(),
        "authorization policy demo/act: action: unknown action value 7"
    );
    let bad_len = pb::Authorization {
        name: "len".into(),
        namespace: "demo".into(),
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    not_destination_ips: vec![cidr("10.0.0.0", 33)],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert_eq!(
        Policy::from_proto(&bad_len).unwrap_err().to_string(),
        "authorization policy demo/len: rules[0].clauses[0].matches[0].not_destination_ips[0]: prefix length 33 is longer than 32"
    );
}

// ---------------------------------------------------------------------------------------------
// L7: waypoint policies
// ---------------------------------------------------------------------------------------------

fn prefix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Prefix(s.into())),
    }
}

fn suffix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Suffix(s.into())),
    }
}

fn gateway() -> wp::PolicyTarget {
    wp::PolicyTarget {
        kind: Some(wp::policy_target::Kind::Gateway("demo/waypoint".into())),
    }
}

fn wp_resource(name: &str, action: wp::Action, rules: Vec<wp::PolicyRule>) -> wp::Policy {
    wp::Policy {
        namespace: "demo".into(),
        name: name.into(),
        action: action as i32,
        dry_run: false,
        targets: vec![gateway()],
        rules,
    }
}

fn wp_policy(action: wp::Action, rules: Vec<wp::PolicyRule>) -> Policy {
    Policy::from_waypoint(&wp_resource("p", action, rules)).unwrap()
}

fn to(op: wp::Operation) -> wp::PolicyRule {
    wp::PolicyRule {
        to: vec![op],
        ..Default::default()
    }
}

fn source(s: wp::Source) -> wp::PolicyRule {
    wp::PolicyRule {
        from: vec![s],
        ..Default::default()
    }
}

fn when(
    key: &str,
    values: Vec<pb::StringMatch>,
    not_values: Vec<pb::StringMatch>,
) -> wp::PolicyRule {
    wp::PolicyRule {
        when: vec![wp::Condition {
            key: key.into(),
            values,
            not_values,
        }],
        ..Default::default()
    }
}

/// A request from `CLIENT` at 10.0.0.1 to the service 10.96.0.10:80.
struct Req {
    conn: ConnectionContext,
    method: &'static str,
    path: &'static str,
    authority: &'static str,
    headers: HeaderMap,
}

fn req(method: &'static str, path: &'static str) -> Req {
    Req {
        conn: from(Some(CLIENT), "10.0.0.1", "10.96.0.10:80"),
        method,
        path,
        authority: "echo.demo.svc.cluster.local:80",
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn from(mut self, identity: Option<&str>, ip: &str) -> Self {
        self.conn = from(identity, ip, &self.conn.dst().to_string());
        self
    }
    fn port(mut self, port: u16) -> Self {
        let mut dst = self.conn.dst();
        dst.set_port(port);
        self.conn = ConnectionContext::danger_assumed_identity(
            self.conn.src_ip(),
            self.conn.src_identity().cloned(),
            dst,
        );
        self
    }
    fn authority(mut self, authority: &'static str) -> Self {
        self.authority = authority;
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.append(name, value.parse().unwrap());
        self
    }
    /// The first rule of `p` matching this request.
    fn rule(&self, p: &Policy) -> Option<usize> {
        let r = self
            .conn
            .with_request(self.method, self.path, self.authority, &self.headers);
        p.matching_rule(&r)
    }
    fn matches(&self, p: &Policy) -> bool {
        self.rule(p).is_some()
    }
}

#[test]
fn operation_hosts_match_without_port_ignoring_case_in_every_form() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            hosts: vec![
                exact("echo.demo.svc.cluster.local"),
                prefix("api."),
                suffix(".example.com"),
            ],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&p));
    assert!(
        req("GET", "/")
            .authority("ECHO.demo.svc.cluster.local")
            .matches(&p)
    );
    assert!(req("GET", "/").authority("api.internal:8080").matches(&p));
    assert!(req("GET", "/").authority("www.Example.COM").matches(&p));
    assert!(!req("GET", "/").authority("other.demo").matches(&p));

    let not = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            not_hosts: vec![suffix(".internal")],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&not));
    assert!(!req("GET", "/").authority("db.internal:5432").matches(&not));

    let any = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            hosts: vec![presence()],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&any));
    assert!(!req("GET", "/").authority("").matches(&any));
}

#[test]
fn operation_ports_are_the_destination_port() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            ports: vec![80, 8080],
            not_ports: vec![8080],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&p));
    assert!(!req("GET", "/").port(8080).matches(&p), "not_ports wins");
    assert!(!req("GET", "/").port(9090).matches(&p));
}

#[test]
fn operation_methods_and_not_methods() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            methods: vec![exact("GET"), exact("HEAD")],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&p));
    assert!(req("HEAD", "/").matches(&p));
    assert!(!req("POST", "/").matches(&p));
    assert!(!req("get", "/").matches(&p), "methods are case-sensitive");
    let not = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            not_methods: vec![exact("DELETE")],
            ..Default::default()
        })],
    );
    assert!(req("PUT", "/").matches(&not));
    assert!(!req("DELETE", "/").matches(&not));
}

#[test]
fn operation_paths_in_every_form_ignore_the_query() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            paths: vec![exact("/healthz"), prefix("/api/"), suffix(".png")],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/healthz").matches(&p));
    assert!(
        req("GET", "/healthz?verbose=1").matches(&p),
        "query ignored"
    );
    assert!(!req("GET", "/healthz/deep").matches(&p));
    assert!(req("GET", "/api/v1/items").matches(&p));
    assert!(req("GET", "/img/logo.png?size=2").matches(&p));
    assert!(!req("GET", "/admin").matches(&p));

    let not = wp_policy(
        wp::Action::Allow,
        vec![to(wp::Operation {
            paths: vec![presence()],
            not_paths: vec![prefix("/admin")],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&not));
    assert!(!req("GET", "/admin/users").matches(&not));
    assert!(!req("GET", "/admin?x").matches(&not));
}

#[test]
fn source_principals_namespaces_and_ip_blocks() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![source(wp::Source {
            principals: vec![prefix("cluster.local/ns/demo/")],
            not_principals: vec![exact("cluster.local/ns/demo/sa/banned")],
            namespaces: vec![exact("demo")],
            ip_blocks: vec![cidr("10.0.0.0", 16)],
            not_ip_blocks: vec![cidr("10.0.9.0", 24)],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&p));
    assert!(!req("GET", "/").from(Some(OTHER), "10.0.0.1").matches(&p));
    assert!(
        !req("GET", "/")
            .from(Some("spiffe://cluster.local/ns/demo/sa/banned"), "10.0.0.1")
            .matches(&p)
    );
    assert!(
        !req("GET", "/").from(Some(CLIENT), "10.1.0.1").matches(&p),
        "outside ipBlocks"
    );
    assert!(
        !req("GET", "/").from(Some(CLIENT), "10.0.9.7").matches(&p),
        "in notIpBlocks"
    );
    assert!(
        !req("GET", "/").from(None, "10.0.0.1").matches(&p),
        "no identity"
    );

    let not_ns = wp_policy(
        wp::Action::Allow,
        vec![source(wp::Source {
            not_namespaces: vec![exact("legacy")],
            ..Default::default()
        })],
    );
    assert!(req("GET", "/").matches(&not_ns));
    assert!(
        !req("GET", "/")
            .from(Some(OTHER), "10.0.0.1")
            .matches(&not_ns)
    );
    assert!(
        req("GET", "/").from(None, "10.0.0.1").matches(&not_ns),
        "notNamespaces holds without identity"
    );
}

#[test]
fn when_request_headers_match_by_case_insensitive_name() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![when(
            "request.headers[X-User]",
            vec![exact("alice"), prefix("admin-")],
            vec![exact("admin-mallory")],
        )],
    );
    assert!(req("GET", "/").header("x-user", "alice").matches(&p));
    assert!(req("GET", "/").header("X-USER", "admin-bob").matches(&p));
    assert!(
        !req("GET", "/")
            .header("x-user", "admin-mallory")
            .matches(&p)
    );
    assert!(!req("GET", "/").header("x-user", "bob").matches(&p));
    assert!(
        !req("GET", "/").matches(&p),
        "absent header matches no value"
    );

    let present = wp_policy(
        wp::Action::Allow,
        vec![when("request.headers[x-token]", vec![presence()], vec![])],
    );
    assert!(req("GET", "/").header("x-token", "").matches(&present));
    assert!(!req("GET", "/").matches(&present));

    let not_only = wp_policy(
        wp::Action::Allow,
        vec![when("request.headers[x-env]", vec![], vec![exact("prod")])],
    );
    assert!(
        req("GET", "/").matches(&not_only),
        "absent header is not prod"
    );
    assert!(req("GET", "/").header("x-env", "dev").matches(&not_only));
    assert!(!req("GET", "/").header("x-env", "prod").matches(&not_only));
}

#[test]
fn when_source_and_destination_keys() {
    let ip = wp_policy(
        wp::Action::Allow,
        vec![when(
            "source.ip",
            vec![exact("10.0.0.0/24"), exact("192.168.1.7")],
            vec![exact("10.0.0.66")],
        )],
    );
    assert!(req("GET", "/").matches(&ip));
    assert!(
        req("GET", "/")
            .from(Some(CLIENT), "192.168.1.7")
            .matches(&ip)
    );
    assert!(!req("GET", "/").from(Some(CLIENT), "10.0.0.66").matches(&ip));
    assert!(
        !req("GET", "/")
            .from(Some(CLIENT), "192.168.1.8")
            .matches(&ip)
    );

    let ns = wp_policy(
        wp::Action::Allow,
        vec![when("source.namespace", vec![exact("demo")], vec![])],
    );
    assert!(req("GET", "/").matches(&ns));
    assert!(!req("GET", "/").from(Some(OTHER), "10.0.0.1").matches(&ns));

    let principal = wp_policy(
        wp::Action::Allow,
        vec![when(
            "source.principal",
            vec![],
            vec![exact("cluster.local/ns/legacy/sa/default")],
        )],
    );
    assert!(req("GET", "/").matches(&principal));
    assert!(
        !req("GET", "/")
            .from(Some(OTHER), "10.0.0.1")
            .matches(&principal)
    );

    let port = wp_policy(
        wp::Action::Allow,
        vec![when("destination.port", vec![exact("80")], vec![])],
    );
    assert!(req("GET", "/").matches(&port));
    assert!(!req("GET", "/").port(81).matches(&port));

    let method = wp_policy(
        wp::Action::Allow,
        vec![when(
            "request.method",
            vec![exact("GET")],
            vec![exact("POST")],
        )],
    );
    assert!(req("GET", "/").matches(&method));
    assert!(!req("POST", "/").matches(&method));
}

#[test]
fn rules_are_ored_and_from_to_when_anded() {
    let p = wp_policy(
        wp::Action::Allow,
        vec![
            // Rule 0: demo clients GET /api/* with an x-ok header.
            wp::PolicyRule {
                from: vec![
                    wp::Source {
                        namespaces: vec![exact("demo")],
                        ..Default::default()
                    },
                    wp::Source {
                        ip_blocks: vec![cidr("192.168.0.0", 16)],
                        ..Default::default()
                    },
                ],
                to: vec![wp::Operation {
                    methods: vec![exact("GET")],
                    paths: vec![prefix("/api/")],
                    ..Default::default()
                }],
                when: vec![wp::Condition {
                    key: "request.headers[x-ok]".into(),
                    values: vec![exact("1")],
                    not_values: vec![],
                }],
            },
            // Rule 1: anyone, /public.
            to(wp::Operation {
                paths: vec![exact("/public")],
                ..Default::default()
            }),
        ],
    );
    let ok = req("GET", "/api/x").header("x-ok", "1");
    assert_eq!(ok.rule(&p), Some(0));
    // Either source alternative: an outsider by IP block.
    assert_eq!(
        req("GET", "/api/x")
            .header("x-ok", "1")
            .from(Some(OTHER), "192.168.3.4")
            .rule(&p),
        Some(0)
    );
    assert_eq!(req("GET", "/api/x").rule(&p), None, "when fails");
    assert_eq!(
        req("POST", "/api/x").header("x-ok", "1").rule(&p),
        None,
        "to fails"
    );
    assert_eq!(
        req("GET", "/api/x")
            .header("x-ok", "1")
            .from(Some(OTHER), "10.0.0.1")
            .rule(&p),
        None,
        "from fails"
    );
    assert_eq!(
        req("POST", "/public").from(None, "10.9.9.9").rule(&p),
        Some(1)
    );

    // An empty rule matches everything; no rules match nothing.
    let everything = wp_policy(wp::Action::Allow, vec![wp::PolicyRule::default()]);
    assert!(
        req("DELETE", "/x")
            .from(None, "10.9.9.9")
            .matches(&everything)
    );
    let nothing = wp_policy(wp::Action::Allow, vec![]);
    assert!(!req("GET", "/").matches(&nothing));
}

#[test]
fn http_fields_on_tcp_fail_allow_rules_and_are_ignored_by_deny_rules() {
    let get_only = |action| {
        wp_policy(
            action,
            vec![wp::PolicyRule {
                from: vec![wp::Source {
                    namespaces: vec![exact("demo")],
                    ..Default::default()
                }],
                to: vec![wp::Operation {
                    methods: vec![exact("GET")],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )
    };
    let demo_tcp = from(Some(CLIENT), "10.0.0.1", "10.96.0.10:80");
    let legacy_tcp = from(Some(OTHER), "10.0.0.1", "10.96.0.10:80");
    // ALLOW: the rule needs a request, TCP does not match it.
    assert!(!get_only(wp::Action::Allow).matches(&demo_tcp));
    // AUDIT: the same (no audit record for traffic the rule cannot describe).
    assert!(!get_only(wp::Action::Audit).matches(&demo_tcp));
    // DENY: the method is ignored, the source still decides.
    assert!(get_only(wp::Action::Deny).matches(&demo_tcp));
    assert!(!get_only(wp::Action::Deny).matches(&legacy_tcp));

    // `not` forms and header conditions behave the same way.
    let not_method = |action| {
        wp_policy(
            action,
            vec![
                to(wp::Operation {
                    not_methods: vec![exact("GET")],
                    ..Default::default()
                }),
                when("request.headers[x-a]", vec![presence()], vec![]),
            ],
        )
    };
    assert!(!not_method(wp::Action::Allow).matches(&demo_tcp));
    assert_eq!(
        not_method(wp::Action::Deny).matching_rule(&demo_tcp),
        Some(0)
    );

    // Through the store: a waypoint with an HTTP-only ALLOW refuses TCP; an HTTP DENY denies it.
    let mut store = PolicyStore::new();
    store.insert(get_only(wp::Action::Allow));
    let targets = [Target::Gateway("demo/waypoint".into())];
    assert!(!store.authorize_targets(&targets, &demo_tcp).allowed);
    assert!(
        store
            .authorize_targets(
                &targets,
                &req("GET", "/")
                    .conn
                    .with_request("GET", "/", "h", &HeaderMap::new())
            )
            .allowed
    );
}

#[test]
fn evaluation_order_deny_then_no_allow_then_allow_then_deny() {
    let targets = [
        Target::Gateway("demo/waypoint".into()),
        Target::Service("demo/echo.demo.svc.cluster.local".into()),
    ];
    let mut store = PolicyStore::new();
    // No policies: allowed, nothing decided.
    let r = req("GET", "/admin");
    let rc = r
        .conn
        .with_request(r.method, r.path, r.authority, &r.headers);
    let d = store.authorize_targets(&targets, &rc);
    assert!(d.allowed);
    assert_eq!(d.decided_by, None);

    // Only a DENY that does not match: still no ALLOW, allowed.
    store.insert(
        Policy::from_waypoint(&wp_resource(
            "deny-admin",
            wp::Action::Deny,
            vec![
                to(wp::Operation {
                    methods: vec![exact("DELETE")],
                    ..Default::default()
                }),
                to(wp::Operation {
                    paths: vec![prefix("/admin")],
                    ..Default::default()
                }),
            ],
        ))
        .unwrap(),
    );
    let get_root = req("GET", "/");
    let rc_root = get_root.conn.with_request(
        get_root.method,
        get_root.path,
        get_root.authority,
        &get_root.headers,
    );
    let d = store.authorize_targets(&targets, &rc_root);
    assert!(d.allowed);
    assert_eq!(d.reason, "allowed: no ALLOW policy applies");

    // An ALLOW that matches /admin too: the DENY still wins, and says which rule.
    let mut allow_all = wp_resource(
        "allow-all",
        wp::Action::Allow,
        vec![wp::PolicyRule::default()],
    );
    allow_all.targets = vec![wp::PolicyTarget {
        kind: Some(wp::policy_target::Kind::Service(
            "demo/echo.demo.svc.cluster.local".into(),
        )),
    }];
    store.insert(Policy::from_waypoint(&allow_all).unwrap());
    let d = store.authorize_targets(&targets, &rc);
    assert!(!d.allowed);
    assert_eq!(
        d.decided_by,
        Some(PolicyMatch {
            policy: "demo/deny-admin".into(),
            action: Action::Deny,
            rule: 1,
        })
    );
    assert_eq!(d.reason, "denied by DENY policy demo/deny-admin");
    let d = store.authorize_targets(&targets, &rc_root);
    assert!(d.allowed);
    assert_eq!(d.policy(), Some("demo/allow-all"));

    // An ALLOW that applies but does not match: denied, no deciding policy.
    store.insert(
        Policy::from_waypoint(&wp_resource(
            "allow-all",
            wp::Action::Allow,
            vec![to(wp::Operation {
                paths: vec![exact("/only")],
                ..Default::default()
            })],
        ))
        .unwrap(),
    );
    let d = store.authorize_targets(&targets, &rc_root);
    assert!(!d.allowed);
    assert_eq!(d.decided_by, None);
    assert_eq!(
        d.reason,
        "denied: no ALLOW policy matched (applicable: demo/allow-all)"
    );
    // Policies attached elsewhere do not apply.
    assert!(
        store
            .authorize_targets(&[Target::Gateway("other/waypoint".into())], &rc)
            .allowed
    );
}

#[test]
fn audit_and_dry_run_are_reported_and_never_enforced() {
    let mut store = PolicyStore::new();
    store.insert(wp_policy_named(
        "audit-posts",
        wp::Action::Audit,
        false,
        vec![
            to(wp::Operation {
                methods: vec![exact("GET")],
                ..Default::default()
            }),
            to(wp::Operation {
                methods: vec![exact("POST")],
                ..Default::default()
            }),
        ],
    ));
    store.insert(wp_policy_named(
        "would-deny",
        wp::Action::Deny,
        true,
        vec![wp::PolicyRule::default()],
    ));
    store.insert(wp_policy_named(
        "would-allow-nothing",
        wp::Action::Allow,
        true,
        vec![],
    ));
    let targets = [Target::Gateway("demo/waypoint".into())];
    let r = req("POST", "/");
    let rc = r
        .conn
        .with_request(r.method, r.path, r.authority, &r.headers);
    let d = store.authorize_targets(&targets, &rc);
    assert!(d.allowed, "audit and dry-run change nothing: {d:?}");
    assert_eq!(d.decided_by, None);
    assert_eq!(
        d.audited,
        vec![PolicyMatch {
            policy: "demo/audit-posts".into(),
            action: Action::Audit,
            rule: 1,
        }]
    );
    assert_eq!(
        d.dry_run,
        vec![PolicyMatch {
            policy: "demo/would-deny".into(),
            action: Action::Deny,
            rule: 0,
        }]
    );
    let r = req("PUT", "/");
    let rc = r
        .conn
        .with_request(r.method, r.path, r.authority, &r.headers);
    assert!(store.authorize_targets(&targets, &rc).audited.is_empty());
}

fn wp_policy_named(
    name: &str,
    action: wp::Action,
    dry_run: bool,
    rules: Vec<wp::PolicyRule>,
) -> Policy {
    let mut resource = wp_resource(name, action, rules);
    resource.dry_run = dry_run;
    Policy::from_waypoint(&resource).unwrap()
}

#[test]
fn targets_index_follows_replacement_and_removal() {
    let mut store = PolicyStore::new();
    let mut resource = wp_resource("p", wp::Action::Deny, vec![wp::PolicyRule::default()]);
    resource.targets.push(wp::PolicyTarget {
        kind: Some(wp::policy_target::Kind::GatewayClass(
            "istio-waypoint".into(),
        )),
    });
    store.insert(Policy::from_waypoint(&resource).unwrap());
    let gw = [Target::Gateway("demo/waypoint".into())];
    let class = [Target::GatewayClass("istio-waypoint".into())];
    assert_eq!(store.applicable_to_targets(&gw).len(), 1);
    assert_eq!(
        store
            .applicable_to_targets(&[gw[0].clone(), class[0].clone()])
            .len(),
        1,
        "one policy on two matching targets counts once"
    );
    // Replaced with a Service target only: the Gateway and class no longer see it.
    resource.targets = vec![wp::PolicyTarget {
        kind: Some(wp::policy_target::Kind::Service("demo/echo".into())),
    }];
    store.insert(Policy::from_waypoint(&resource).unwrap());
    assert!(store.applicable_to_targets(&gw).is_empty());
    assert!(store.applicable_to_targets(&class).is_empty());
    let svc = [Target::Service("demo/echo".into())];
    assert_eq!(store.applicable_to_targets(&svc).len(), 1);
    // Waypoint policies never apply through ztunnel's namespace scope.
    assert!(store.applicable("demo", &[]).is_empty());
    assert!(store.remove("demo/p"));
    assert!(store.applicable_to_targets(&svc).is_empty());
}

#[test]
fn invalid_waypoint_resources_name_policy_and_field() {
    let error = |resource: wp::Policy| Policy::from_waypoint(&resource).unwrap_err().to_string();
    let mut bad_action = wp_resource("act", wp::Action::Allow, vec![]);
    bad_action.action = 9;
    assert_eq!(
        error(bad_action),
        "authorization policy demo/act: action: unknown action value 9"
    );
    let mut no_targets = wp_resource("nt", wp::Action::Allow, vec![]);
    no_targets.targets.clear();
    assert_eq!(
        error(no_targets),
        "authorization policy demo/nt: targets: must name at least one Gateway, Service or GatewayClass"
    );
    let mut empty_target = wp_resource("et", wp::Action::Allow, vec![]);
    empty_target.targets.push(wp::PolicyTarget { kind: None });
    assert_eq!(
        error(empty_target),
        "authorization policy demo/et: targets[1]: sets none of gateway, service, gateway_class"
    );
    assert_eq!(
        error(wp_resource(
            "k",
            wp::Action::Allow,
            vec![when("request.auth.claims[iss]", vec![exact("x")], vec![])]
        )),
        "authorization policy demo/k: rules[0].when[0].key: unsupported condition key \"request.auth.claims[iss]\" (supported: request.headers[<name>], source.ip, source.namespace, source.principal, destination.port, request.method)"
    );
    assert_eq!(
        error(wp_resource(
            "ip",
            wp::Action::Allow,
            vec![
                wp::PolicyRule::default(),
                when(
                    "source.ip",
                    vec![exact("10.0.0.1"), exact("10.0.0.300")],
                    vec![]
                )
            ]
        )),
        "authorization policy demo/ip: rules[1].when[0].values[1]: \"10.0.0.300\" is not an IP address or CIDR block"
    );
    assert_eq!(
        error(wp_resource(
            "port",
            wp::Action::Allow,
            vec![when("destination.port", vec![], vec![prefix("80")])]
        )),
        "authorization policy demo/port: rules[0].when[0].not_values[0]: must be an exact port number, not a prefix, suffix or presence match"
    );
    assert_eq!(
        error(wp_resource(
            "port0",
            wp::Action::Allow,
            vec![when("destination.port", vec![exact("0")], vec![])]
        )),
        "authorization policy demo/port0: rules[0].when[0].values[0]: \"0\" is not a port in 1-65535"
    );
    assert_eq!(
        error(wp_resource(
            "hdr",
            wp::Action::Allow,
            vec![when(
                "request.headers[bad header]",
                vec![presence()],
                vec![]
            )]
        )),
        "authorization policy demo/hdr: rules[0].when[0].key: \"bad header\" is not a valid header name"
    );
    assert_eq!(
        error(wp_resource(
            "empty",
            wp::Action::Allow,
            vec![when("source.namespace", vec![], vec![])]
        )),
        "authorization policy demo/empty: rules[0].when[0].values: condition on \"source.namespace\" sets neither values nor not_values"
    );
    assert_eq!(
        error(wp_resource(
            "blocks",
            wp::Action::Allow,
            vec![source(wp::Source {
                not_ip_blocks: vec![pb::Address {
                    address: vec![10, 0],
                    length: 8,
                }],
                ..Default::default()
            })]
        )),
        "authorization policy demo/blocks: rules[0].from[0].not_ip_blocks[0]: address has 2 bytes, expected 4 or 16"
    );
    assert_eq!(
        error(wp_resource(
            "ports",
            wp::Action::Allow,
            vec![to(wp::Operation {
                not_ports: vec![65536],
                ..Default::default()
            })]
        )),
        "authorization policy demo/ports: rules[0].to[0].not_ports[0]: port 65536 is outside 1-65535"
    );
    assert_eq!(
        error(wp_resource(
            "sm",
            wp::Action::Allow,
            vec![to(wp::Operation {
                paths: vec![pb::StringMatch { match_type: None }],
                ..Default::default()
            })]
        )),
        "authorization policy demo/sm: rules[0].to[0].paths[0]: string match sets none of exact, prefix, suffix, presence"
    );
    assert_eq!(
        error(wp_resource("", wp::Action::Allow, vec![])),
        "authorization policy demo/: name: must not be empty"
    );
}

#[test]
fn l4_policies_and_verified_context_are_unaffected_by_request_fields() {
    // A ztunnel policy evaluated for an HTTP request at a waypoint behaves as for the connection.
    let mut store = PolicyStore::new();
    store.insert(policy(
        "demo",
        "allow-client",
        pb::Scope::Namespace,
        pb::Action::Allow,
        vec![pb::Match {
            principals: vec![exact("cluster.local/ns/demo/sa/client")],
            ..Default::default()
        }],
    ));
    let r = req("GET", "/");
    let rc = r
        .conn
        .with_request(r.method, r.path, r.authority, &r.headers);
    let d = store.authorize("demo", &[], &rc);
    assert!(d.allowed);
    assert_eq!(
        d.decided_by,
        Some(PolicyMatch {
            policy: "demo/allow-client".into(),
            action: Action::Allow,
            rule: 0,
        })
    );
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let plain = ConnectionContext::plaintext(ip, "10.96.0.10:80".parse().unwrap());
    assert!(plain.src_identity().is_none());
    assert!(!store.authorize("demo", &[], &plain).allowed);
}
