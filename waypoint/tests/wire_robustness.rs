//! What the proxies take from the control plane is decoded, indexed, compiled and used without a
//! panic however a resource is damaged on the way. Every resource istiod-lite's translation makes
//! of the analyze corpus (`tests/fixtures/analyze/**.yaml`, Istio's canary example) is encoded,
//! then mutated byte by byte by proptest (bits flipped, bytes dropped or inserted, cut short);
//! whatever still decodes goes through the code the proxies run: ztunnel's address index
//! (insert, update, lookups, endpoint choice, removal), the authorization engine (from the L4 and
//! the waypoint forms, evaluated on a connection and a request) and the waypoint's route table
//! (compiled, then asked for a decision). Bounded and repeatable: `PROPTEST_CASES` cases (default
//! 4096: most damaged encodings no longer decode, and a case takes microseconds) from a fixed seed
//! unless `PROPTEST_RNG_SEED` says otherwise.

use std::net::{IpAddr, SocketAddr};

#[path = "../../tests/support/seeded.rs"]
mod seeded;

use ambit_authz::{ConnectionContext, Policy, evaluate};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::security as sec;
use ambit_proto::waypoint as wp;
use ambit_proto::workload as pb;
use ambit_state::Addresses;
use http::HeaderMap;
use proptest::prelude::*;
use prost::Message;
use waypoint::routes::{RequestView, RouteTable};

/// One resource as the control plane sends it.
#[derive(Debug, Clone)]
enum Resource {
    Address(String, Vec<u8>),
    Authorization(Vec<u8>),
    Route(Vec<u8>),
    Policy(Vec<u8>),
}

/// The encoded resources of every corpus file, translated as istiod-lite translates them (each
/// waypoint Gateway given the address its controller would write, so routes and policies bind).
fn resources() -> Vec<Resource> {
    let mut out = Vec::new();
    for path in seeded::corpus(env!("CARGO_MANIFEST_DIR")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let (objects, _) = ambit_mesh::parse_documents(&text, "corpus");
        let objects: Vec<ambit_mesh::Object> = objects
            .into_iter()
            .map(|mut o| {
                if let ambit_mesh::Object::Gateway(g) = &mut o
                    && g.status.addresses.is_empty()
                {
                    g.status.addresses = vec![ambit_mesh::gateway_api::GatewayStatusAddress {
                        kind: Some("IPAddress".into()),
                        value: "10.96.200.1".into(),
                    }];
                }
                o
            })
            .collect();
        let r = translate(&Cluster::from_objects(objects), &MeshSettings::default());
        out.extend(
            r.addresses
                .iter()
                .map(|(name, a)| Resource::Address(name.clone(), a.encode_to_vec())),
        );
        out.extend(
            r.authorizations
                .values()
                .map(|a| Resource::Authorization(a.encode_to_vec())),
        );
        out.extend(
            r.routes
                .values()
                .map(|a| Resource::Route(a.encode_to_vec())),
        );
        out.extend(
            r.l7_policies
                .values()
                .map(|a| Resource::Policy(a.encode_to_vec())),
        );
    }
    out
}

/// A change to an encoded resource; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Drop(usize),
    Insert(usize, u8),
    Cut(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Edit::Flip(at, mask)),
        any::<usize>().prop_map(Edit::Drop),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<usize>().prop_map(Edit::Cut),
    ]
}

fn damage(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        match *e {
            Edit::Flip(at, mask) if len > 0 => bytes[at % len] ^= mask,
            Edit::Drop(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Edit::Insert(at, b) => bytes.insert(at % (len + 1), b),
            Edit::Cut(at) => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
    bytes
}

fn address_ips(a: &pb::Address) -> Vec<(String, IpAddr)> {
    let raw: Vec<(String, Vec<u8>)> = match &a.r#type {
        Some(pb::address::Type::Workload(w)) => w
            .addresses
            .iter()
            .map(|ip| (w.network.clone(), ip.to_vec()))
            .collect(),
        Some(pb::address::Type::Service(s)) => s
            .addresses
            .iter()
            .map(|n| (n.network.clone(), n.address.clone()))
            .collect(),
        None => Vec::new(),
    };
    raw.into_iter()
        .filter_map(|(network, bytes)| {
            let ip = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
                _ => return None,
            };
            Some((network, ip))
        })
        .collect()
}

/// ztunnel's side: index it, look it up, choose endpoints, update and remove it.
fn ingest_address(name: &str, address: pb::Address) {
    let state = Addresses::new("node-1");
    let _ = state.apply(&[(name.to_string(), address.clone())], &[]);
    {
        let index = state.index();
        for (network, ip) in address_ips(&address) {
            let _ = index.find_address(&network, ip);
            let _ = index.workload_by_ip(&network, ip);
        }
        for service in index.services() {
            let _ = index.any_endpoint(service);
            for port in service.ports.iter() {
                let _ = index.candidates(service, port.service_port, None, &|_| true);
            }
        }
    }
    let _ = state.apply(&[(name.to_string(), address)], &[]);
    let _ = state.apply(&[], &[name.to_string()]);
}

fn conn() -> ConnectionContext {
    ConnectionContext::plaintext(
        "10.244.1.5".parse().unwrap(),
        SocketAddr::from(([10, 244, 2, 7], 8080)),
    )
}

fn use_resource(resource: &Resource, bytes: &[u8]) {
    match resource {
        Resource::Address(name, _) => {
            if let Ok(a) = pb::Address::decode(bytes) {
                ingest_address(name, a);
            }
        }
        Resource::Authorization(_) => {
            if let Ok(a) = sec::Authorization::decode(bytes)
                && let Ok(policy) = Policy::from_proto(&a)
            {
                let _ = evaluate([&policy], &conn());
            }
        }
        Resource::Policy(_) => {
            if let Ok(p) = wp::Policy::decode(bytes)
                && let Ok(policy) = Policy::from_waypoint(&p)
            {
                let c = conn();
                let mut headers = HeaderMap::new();
                headers.insert("x-canary", "true".parse().unwrap());
                let request = c.with_request("GET", "/admin?x=1", "echo.demo:80", &headers);
                let _ = evaluate([&policy], &request);
                let _ = evaluate([&policy], &c);
            }
        }
        Resource::Route(_) => {
            if let Ok(route) = wp::Route::decode(bytes) {
                let (table, _) = RouteTable::build([&route]);
                let mut headers = HeaderMap::new();
                headers.insert("x-canary", "true".parse().unwrap());
                for grpc in [false, true] {
                    let request = RequestView {
                        method: "GET",
                        path: "/reviews/1",
                        query: Some("a=b"),
                        headers: &headers,
                        grpc,
                    };
                    for parent in &route.parents {
                        let port = u16::try_from(parent.port).unwrap_or(80);
                        let _ = table.decide(&parent.service, port, &request);
                        let _ = table.tcp_rule(&parent.service, port);
                        let _ = table.has_routes(&parent.service);
                    }
                }
            }
        }
    }
}

fn encoded(resource: &Resource) -> &[u8] {
    match resource {
        Resource::Address(_, b)
        | Resource::Authorization(b)
        | Resource::Route(b)
        | Resource::Policy(b) => b,
    }
}

#[test]
fn damaged_control_plane_resources_never_panic_the_proxies() {
    let resources = resources();
    for kind in ["Address", "Authorization", "Route", "Policy"] {
        assert!(
            resources.iter().any(|r| format!("{r:?}").starts_with(kind)),
            "the corpus yields no {kind}"
        );
    }
    // The undamaged resources first: all of them are used as they are.
    for r in &resources {
        use_resource(r, encoded(r));
    }
    let mut runner = seeded::runner(4096);
    let strategy = (0..resources.len(), proptest::collection::vec(edit(), 1..4));
    let result = runner.run(&strategy, |(which, edits)| {
        let resource = &resources[which];
        let bytes = damage(encoded(resource).to_vec(), &edits);
        let used = std::panic::catch_unwind(|| use_resource(resource, &bytes));
        prop_assert!(used.is_ok(), "{resource:?} damaged by {edits:?} panicked");
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
