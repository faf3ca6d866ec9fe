//! The waypoint's data path in one process, on loopback: a real HBONE client (mTLS, HTTP/2
//! CONNECT) reaches the real HBONE listener and proxy; backends are real HTTP and TCP servers.
//! Only the waypoint's outbound tunnel is replaced by plain TCP to the chosen endpoint (the lab
//! tests cover HBONE out). What is checked is what a client sees: status codes, bodies, headers,
//! which backend answered, and the metrics.

#[path = "../../tests/support/otlp_python.rs"]
mod otlp_python;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_hbone::{ConnectRequest, HboneStream, Pool, PoolConfig, PoolKey, TlsDialer};
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_identity::{Identity, WorkloadCertificate};
use ambit_proto::security as sec;
use ambit_proto::waypoint as wp;
use ambit_proto::workload as pb;
use ambit_state::Addresses;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use waypoint::proxy::{L7Config, Proxy, ProxySettings};
use waypoint::routes::RouteTable;
use waypoint::telemetry::Telemetry;
use waypoint::upstream::{BoxedIo, Dial, Endpoint, UpstreamError};

const TD: &str = "cluster.local";
const VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 1);
const V1_VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 2);
const V2_VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 3);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 4);
const V1_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const V2_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const ECHO: &str = "demo/echo.demo.svc.cluster.local";
const FLAKY: &str = "demo/flaky.demo.svc.cluster.local";
const FLAKY_VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 5);
const BAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// A pod the waypoint's tunnel never reaches, behind Service `hang`.
const HANG_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const HANG_VIP: Ipv4Addr = Ipv4Addr::new(127, 255, 0, 6);
const HANG: &str = "demo/hang.demo.svc.cluster.local";
const ECHO_V1: &str = "demo/echo-v1.demo.svc.cluster.local";
const ECHO_V2: &str = "demo/echo-v2.demo.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(30);

/// Plain TCP to the endpoint: the waypoint's outbound tunnel, minus the tunnel.
struct PlainDial;

impl Dial for PlainDial {
    fn dial(
        &self,
        endpoint: &Endpoint,
    ) -> Pin<Box<dyn Future<Output = Result<BoxedIo, UpstreamError>> + Send>> {
        let addr = endpoint.addr;
        Box::pin(async move {
            if addr.ip() == IpAddr::V4(HANG_IP) {
                // A pod whose tunnel never opens (its node is unreachable).
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| UpstreamError::Connect {
                    endpoint: addr,
                    reason: e.to_string(),
                })?;
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

/// One connection a backend accepted: the requests it carried, and whether it is closed.
#[derive(Debug, Default)]
struct Accepted {
    requests: AtomicUsize,
    closed: std::sync::atomic::AtomicBool,
}

/// Every connection a backend accepted, in order.
type Connections = Arc<std::sync::Mutex<Vec<Arc<Accepted>>>>;

/// An HTTP backend (HTTP/1.1 and h2c) that answers JSON naming itself, with the request it saw;
/// `/status/<code>` answers that code; it adds `x-backend` to every response. Returns its
/// address, its request count and the connections it accepted.
async fn http_backend(
    ip: Ipv4Addr,
    port: u16,
    name: &'static str,
) -> (SocketAddr, Arc<AtomicUsize>, Connections) {
    let listener = TcpListener::bind((ip, port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let connections = Connections::default();
    let accepted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            let this = Arc::new(Accepted::default());
            accepted.lock().unwrap().push(this.clone());
            tokio::spawn(async move {
                let on_conn = this.clone();
                let service = service_fn(move |mut request: Request<Incoming>| {
                    let counter = counter.clone();
                    let on_conn = on_conn.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        on_conn.requests.fetch_add(1, Ordering::SeqCst);
                        if name == "bad" && request.headers().contains_key("x-bad-hangs") {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        if let Some(ms) = request
                            .headers()
                            .get("x-delay-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if request.headers().contains_key("upgrade") {
                            // Answer 101 and echo whatever arrives on the upgraded connection.
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = upgrade.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut response = hyper::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            response
                                .headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            response
                                .headers_mut()
                                .insert("upgrade", "websocket".parse().unwrap());
                            return Ok::<_, std::convert::Infallible>(response);
                        }
                        let headers: BTreeMap<String, String> = request
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let host = request
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| headers.get("host").cloned())
                            .unwrap_or_default();
                        let path = request.uri().path().to_string();
                        let status = path
                            .strip_prefix("/status/")
                            .and_then(|c| c.parse::<u16>().ok())
                            .unwrap_or(if name == "bad" { 503 } else { 200 });
                        let body = json!({
                            "backend": name,
                            "method": request.method().as_str(),
                            "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                            "host": host,
                            "version": format!("{:?}", request.version()),
                            "headers": headers,
                        });
                        let mut response =
                            hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        response
                            .headers_mut()
                            .insert("x-backend", name.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
                this.closed.store(true, Ordering::SeqCst);
            });
        }
    });
    (addr, hits, connections)
}

/// A server-first TCP backend: greets before reading, then echoes one line.
async fn server_first_backend(ip: Ipv4Addr, port: u16) {
    let listener = TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 hello from smtp-like\r\n").await;
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
}

fn ip_bytes(ip: Ipv4Addr) -> Vec<u8> {
    ip.octets().to_vec()
}

fn port(service_port: u16, target_port: u16, protocol: pb::AppProtocol) -> pb::Port {
    pb::Port {
        service_port: service_port.into(),
        target_port: target_port.into(),
        app_protocol: protocol as i32,
    }
}

fn service(name: &str, vip: Ipv4Addr, ports: Vec<pb::Port>) -> (String, pb::Address) {
    let svc = pb::Service {
        name: name.into(),
        namespace: "demo".into(),
        hostname: format!("{name}.demo.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
            length: None,
        }],
        ports,
        ..Default::default()
    };
    (
        svc.resource_name(),
        pb::Address {
            r#type: Some(pb::address::Type::Service(svc)),
        },
    )
}

fn workload(name: &str, ip: Ipv4Addr, services: &[&str]) -> (String, pb::Address) {
    let uid = format!("Kubernetes//Pod/demo/{name}");
    let w = pb::Workload {
        uid: uid.clone(),
        name: name.into(),
        namespace: "demo".into(),
        addresses: vec![ip_bytes(ip)],
        service_account: "echo".into(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        canonical_name: "echo".into(),
        canonical_revision: name.trim_start_matches("echo-").into(),
        workload_name: name.into(),
        services: services
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    pb::PortList {
                        ports: vec![port(80, 0, pb::AppProtocol::Unknown)],
                    },
                )
            })
            .collect(),
        ..Default::default()
    };
    (
        uid,
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )
}

fn client_workload() -> (String, pb::Address) {
    let mut entry = workload("client", Ipv4Addr::LOCALHOST, &[]);
    if let Some(pb::address::Type::Workload(w)) = &mut entry.1.r#type {
        w.service_account = "client".into();
        w.canonical_name = "client".into();
        w.workload_name = "client".into();
    }
    entry
}

struct World {
    waypoint: SocketAddr,
    client_cert: Arc<WorkloadCertificate>,
    waypoint_id: Identity,
    proxy: Arc<Proxy>,
    registry: Registry,
    backend_port: u16,
    v2_hits: Arc<AtomicUsize>,
    v1_connections: Connections,
    _drain: drain::DrainTrigger,
}

async fn world() -> World {
    world_with(waypoint::tracing::Tracer::disabled()).await
}

async fn world_with(tracer: waypoint::tracing::Tracer) -> World {
    // Two backends on the same port of two loopback addresses, like two pods.
    let (first, _, v1_connections) = http_backend(V1_IP, 0, "v1").await;
    let backend_port = first.port();
    let (_, v2_hits, _) = http_backend(V2_IP, backend_port, "v2").await;
    http_backend(BAD_IP, backend_port, "bad").await;
    server_first_backend(V1_IP, backend_port + 1).await;
    server_first_backend(V2_IP, backend_port + 1).await;

    let ca = CertificateAuthority::generate_root(TD, Duration::from_secs(86_400)).unwrap();
    let client_id = Identity::new(TD, "demo", "client").unwrap();
    let waypoint_id = Identity::new(TD, "demo", "waypoint").unwrap();
    let client_cert = Arc::new(ca.issue(&client_id, Duration::from_secs(3600)).unwrap());
    let certs = CertStore::new(Arc::new(ca), StoreConfig::default());

    let state = Addresses::new("node-1");
    let bp = u32::from(backend_port);
    let tcp = port(25, bp as u16 + 1, pb::AppProtocol::Tcp);
    let rejected = state.apply(
        &[
            service(
                "echo",
                VIP,
                vec![
                    port(80, backend_port, pb::AppProtocol::Http11),
                    port(8080, backend_port, pb::AppProtocol::Unknown),
                    tcp,
                ],
            ),
            service(
                "echo-v1",
                V1_VIP,
                vec![port(80, backend_port, pb::AppProtocol::Http11)],
            ),
            service(
                "echo-v2",
                V2_VIP,
                vec![port(80, backend_port, pb::AppProtocol::Http11)],
            ),
            service(
                "empty",
                EMPTY_VIP,
                vec![port(80, backend_port, pb::AppProtocol::Http11)],
            ),
            service(
                "flaky",
                FLAKY_VIP,
                vec![port(80, backend_port, pb::AppProtocol::Http11)],
            ),
            workload("echo-v1", V1_IP, &[ECHO, ECHO_V1, FLAKY]),
            workload("echo-v2", V2_IP, &[ECHO, ECHO_V2, FLAKY]),
            service(
                "hang",
                HANG_VIP,
                vec![port(80, backend_port, pb::AppProtocol::Http11)],
            ),
            workload("echo-bad", BAD_IP, &[FLAKY]),
            workload("echo-hang", HANG_IP, &[HANG]),
            client_workload(),
        ],
        &[],
    );
    assert!(rejected.is_empty(), "{rejected:?}");

    let registry = Registry::new();
    let proxy = Proxy::with_tracer(
        ProxySettings {
            gateway: "demo/waypoint".into(),
            gateway_class: "istio-waypoint".into(),
            network: String::new(),
            sniff_timeout: Duration::from_millis(200),
            instance_ip: None,
        },
        state,
        Arc::new(PlainDial),
        Telemetry::new(registry.clone()),
        tracer,
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let waypoint = listener.local_addr().unwrap();
    let (trigger, watcher) = drain::new();
    tokio::spawn(waypoint::hbone::serve(
        listener,
        proxy.clone(),
        certs,
        waypoint_id.clone(),
        watcher,
    ));
    World {
        waypoint,
        client_cert,
        waypoint_id,
        proxy,
        registry,
        backend_port,
        v2_hits,
        v1_connections,
        _drain: trigger,
    }
}

impl World {
    /// Opens a tunnel to the waypoint for `authority`, as ztunnel does for the client pod.
    async fn tunnel(&self, authority: SocketAddr) -> HboneStream {
        let pool = Pool::new(
            PoolConfig::default(),
            Arc::new(TlsDialer::with_certificate(self.client_cert.clone())),
        );
        let key = PoolKey {
            src_id: self.client_cert.identity().clone(),
            dst_ids: vec![self.waypoint_id.clone()],
            dst: self.waypoint,
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        tokio::time::timeout(
            WAIT,
            pool.connect(key, ConnectRequest::new(authority.to_string())),
        )
        .await
        .expect("tunnel in time")
        .expect("tunnel accepted")
    }

    /// One HTTP/1.1 request through a fresh tunnel; returns status, headers and JSON body.
    async fn get(&self, authority: SocketAddr, request: Request<Empty<Bytes>>) -> Answer {
        let io = TokioIo::new(self.tunnel(authority).await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("answer in time")
            .expect("an HTTP answer");
        Answer::read(response).await
    }

    async fn get_path(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut builder = Request::builder()
            .uri(path)
            .header("host", "echo.demo.svc.cluster.local");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.get(
            SocketAddr::new(VIP.into(), 80),
            builder.body(Empty::new()).unwrap(),
        )
        .await
    }

    fn set_routes(&self, routes: &[wp::Route], policies: &[wp::Policy]) {
        self.set_l7(routes, policies, &[]);
    }

    fn set_l7(
        &self,
        routes: &[wp::Route],
        policies: &[wp::Policy],
        destinations: &[wp::DestinationPolicy],
    ) {
        let (table, errors) = RouteTable::build(routes);
        assert!(errors.is_empty(), "{errors:?}");
        let mut store = ambit_authz::PolicyStore::new();
        for p in policies {
            store.insert(ambit_authz::Policy::from_waypoint(p).unwrap());
        }
        self.proxy.set_l7(L7Config {
            routes: table,
            policies: store,
            route_names: routes.iter().map(|r| r.resource_name()).collect(),
            destinations: waypoint::traffic::Destinations::build(destinations),
        });
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    async fn read(response: http::Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    fn backend(&self) -> &str {
        self.body["backend"].as_str().unwrap_or("none")
    }
}

fn exact_header(name: &str, value: &str) -> wp::StringMatch {
    wp::StringMatch {
        name: name.into(),
        r#type: wp::MatchType::Exact as i32,
        value: value.into(),
    }
}

fn backend(service: &str, weight: u32) -> wp::Backend {
    wp::Backend {
        service: service.into(),
        port: 80,
        weight,
        ..Default::default()
    }
}

fn route(rules: Vec<wp::Rule>) -> wp::Route {
    wp::Route {
        namespace: "demo".into(),
        name: "echo".into(),
        parents: vec![wp::ParentRef {
            service: ECHO.into(),
            port: 80,
        }],
        rules,
        ..Default::default()
    }
}

fn prefix(path: &str) -> Option<wp::PathMatch> {
    Some(wp::PathMatch {
        r#type: wp::MatchType::Prefix as i32,
        value: path.into(),
    })
}

fn filter(kind: wp::filter::Kind) -> wp::Filter {
    wp::Filter { kind: Some(kind) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_filters_policies_and_failures_as_a_client_sees_them() {
    let w = world().await;

    // No routes: the Service itself, both pods answer; the request gets an id and a trace.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let answer = w.get_path("/", &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        seen.insert(answer.backend().to_string());
        assert!(answer.body["headers"]["x-request-id"].is_string());
        assert!(
            answer.body["headers"]["traceparent"]
                .as_str()
                .is_some_and(|t| t.starts_with("00-"))
        );
        // The Host header reached the backend untouched.
        assert_eq!(answer.body["host"], "echo.demo.svc.cluster.local");
    }
    assert_eq!(seen.len(), 2, "both pods answer: {seen:?}");

    // A canary route: x-canary: true -> v2; /old redirects; /api rewritten to v1 with headers
    // set; the rest split 90/10; /nowhere has an invalid backend; DELETE /admin denied by
    // policy.
    w.set_routes(
        &[route(vec![
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    headers: vec![exact_header("x-canary", "true")],
                    ..Default::default()
                }],
                backends: vec![backend(ECHO_V2, 1)],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/old"),
                    ..Default::default()
                }],
                filters: vec![filter(wp::filter::Kind::RequestRedirect(
                    wp::RequestRedirect {
                        path: Some(wp::PathModifier {
                            r#type: wp::PathModifierType::PrefixMatch as i32,
                            value: "/new".into(),
                        }),
                        status_code: 301,
                        ..Default::default()
                    },
                ))],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/api"),
                    ..Default::default()
                }],
                filters: vec![
                    filter(wp::filter::Kind::UrlRewrite(wp::UrlRewrite {
                        hostname: "rewritten.example".into(),
                        path: Some(wp::PathModifier {
                            r#type: wp::PathModifierType::PrefixMatch as i32,
                            value: "/v2".into(),
                        }),
                    })),
                    filter(wp::filter::Kind::RequestHeaderModifier(
                        wp::HeaderModifier {
                            set: vec![wp::Header {
                                name: "x-routed".into(),
                                value: "api".into(),
                            }],
                            remove: vec!["x-drop-me".into()],
                            ..Default::default()
                        },
                    )),
                    filter(wp::filter::Kind::ResponseHeaderModifier(
                        wp::HeaderModifier {
                            add: vec![wp::Header {
                                name: "x-served-by".into(),
                                value: "waypoint".into(),
                            }],
                            ..Default::default()
                        },
                    )),
                ],
                backends: vec![backend(ECHO_V1, 1)],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/nowhere"),
                    ..Default::default()
                }],
                backends: vec![wp::Backend {
                    invalid: "Service demo/missing not found".into(),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/empty"),
                    ..Default::default()
                }],
                backends: vec![backend("demo/empty.demo.svc.cluster.local", 1)],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/split"),
                    ..Default::default()
                }],
                backends: vec![backend(ECHO_V1, 90), backend(ECHO_V2, 10)],
                ..Default::default()
            },
        ])],
        &[wp::Policy {
            namespace: "demo".into(),
            name: "no-admin-delete".into(),
            action: wp::Action::Deny as i32,
            targets: vec![wp::PolicyTarget {
                kind: Some(wp::policy_target::Kind::Service(ECHO.into())),
            }],
            rules: vec![wp::PolicyRule {
                to: vec![wp::Operation {
                    methods: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact("DELETE".into())),
                    }],
                    paths: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Prefix("/admin".into())),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    );

    // The canary rule matches any path with the header; a longer path prefix outranks it, as
    // the Gateway API's precedence says (path before headers).
    for path in ["/", "/anything/else"] {
        let answer = w.get_path(path, &[("x-canary", "true")]).await;
        assert_eq!(answer.backend(), "v2", "{}", answer.text);
    }
    let answer = w.get_path("/api/x", &[("x-canary", "true")]).await;
    assert_eq!(answer.backend(), "v1", "{}", answer.text);
    let mut v2 = 0;
    let total = 200;
    for _ in 0..total {
        if w.get_path("/split", &[]).await.backend() == "v2" {
            v2 += 1;
        }
    }
    // 10% of 200 = 20; a binomial(200, 0.1) is inside [6, 40] with probability > 0.9999.
    assert!((6..=40).contains(&v2), "v2 answered {v2} of {total}");

    let answer = w.get_path("/old/page?x=1", &[]).await;
    assert_eq!(answer.status, 301);
    assert_eq!(
        answer.headers["location"],
        "http://echo.demo.svc.cluster.local/new/page?x=1"
    );

    let answer = w
        .get_path("/api/items?limit=2", &[("x-drop-me", "1")])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.backend(), "v1");
    assert_eq!(answer.body["path"], "/v2/items?limit=2");
    assert_eq!(answer.body["host"], "rewritten.example");
    assert_eq!(answer.body["headers"]["x-routed"], "api");
    assert!(answer.body["headers"].get("x-drop-me").is_none());
    assert_eq!(answer.headers["x-served-by"], "waypoint");

    let answer = w.get_path("/nowhere", &[]).await;
    assert_eq!(answer.status, 500, "{}", answer.text);
    assert!(answer.text.contains("demo/missing"), "{}", answer.text);

    let answer = w.get_path("/empty", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert!(
        answer.text.contains("no healthy upstream"),
        "{}",
        answer.text
    );

    // Routes attach to port 80 only: no match there is 404; port 8080 (sniffed) is untouched.
    let answer = w.get_path("/unmatched", &[]).await;
    assert_eq!(answer.status, 404, "{}", answer.text);
    let answer = w
        .get(
            SocketAddr::new(VIP.into(), 8080),
            Request::builder()
                .uri("/unmatched")
                .header("host", "echo")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Pod-addressed traffic never uses routes (the canary header would send it to v2).
    let answer = w
        .get(
            SocketAddr::new(V1_IP.into(), w.backend_port),
            Request::builder()
                .uri("/unmatched")
                .header("host", "whatever")
                .header("x-canary", "true")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.backend(), "v1");

    // Hop-by-hop headers stay on the client's connection: the backend sees none of them, so a
    // client's `Connection: close` does not close the pooled upstream connection.
    let answer = w
        .get_path(
            "/split",
            &[
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("te", "trailers"),
            ],
        )
        .await;
    let seen = &answer.body["headers"];
    assert!(
        seen.get("connection").is_none() && seen.get("x-hop").is_none(),
        "{seen}"
    );
    assert_eq!(seen["te"], "trailers");

    // The Host header never chooses the Service.
    let answer = w
        .get(
            SocketAddr::new(V2_VIP.into(), 80),
            Request::builder()
                .uri("/split")
                .header("host", "echo.demo.svc.cluster.local")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.backend(), "v2", "{}", answer.text);

    // L7 policy: DELETE /admin refused with Istio's text; GET /admin passes.
    let delete = Request::builder()
        .method("DELETE")
        .uri("/admin/users")
        .header("host", "echo")
        .header("x-canary", "true")
        .body(Empty::new())
        .unwrap();
    let answer = w.get(SocketAddr::new(VIP.into(), 80), delete).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.text.trim(), "RBAC: access denied");
    let answer = w.get_path("/admin/users", &[("x-canary", "true")]).await;
    assert_eq!(answer.status, 200);

    // Metrics: reporter=waypoint with the full label set, destination from the chosen pod.
    let text = w.registry.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"403\""))
        .unwrap_or_else(|| panic!("no 403 series in:\n{text}"));
    for label in [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_service=\"echo.demo.svc.cluster.local\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"503\"")
            && l.contains("response_flags=\"UH\"")),
        "no UH series:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_workload=\"echo-v2\"")
            && l.contains("destination_canonical_revision=\"v2\"")),
        "no series for echo-v2:\n{text}"
    );
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
}

/// Sends raw HTTP/1 `requests` (written together) through a fresh tunnel and reads until the
/// waypoint ends the tunnel.
async fn raw_exchange(w: &World, requests: &str) -> String {
    let mut tunnel = w.tunnel(SocketAddr::new(VIP.into(), 80)).await;
    tunnel.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tunnel.read_to_end(&mut answer))
        .await
        .expect("the waypoint ends the tunnel after the last answer")
        .unwrap();
    String::from_utf8_lossy(&answer).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_its_connection_is_told_so_and_the_backend_is_not() {
    let w = world().await;
    let host = "Host: echo.demo.svc.cluster.local\r\n";

    // Connection: close: the answer says `connection: close` (RFC 9112 9.6), so a client opens
    // its next connection at once, and the tunnel ends after it; the backend's pooled
    // connection is not asked to close (hop-by-hop).
    let answer = raw_exchange(
        &w,
        &format!("GET / HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head}"
    );
    let echoed: Value = serde_json::from_str(body).expect("the echo's JSON");
    assert!(echoed["headers"].get("connection").is_none(), "{echoed}");

    // HTTP/1.0 without keep-alive closes too; with keep-alive it does not.
    let answer = raw_exchange(&w, &format!("GET / HTTP/1.0\r\n{host}\r\n")).await;
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close"),
        "{answer}"
    );

    // Keep-alive: two requests on one connection, neither answer says close; the tunnel ends only
    // because the second request asks for it.
    let answer = raw_exchange(
        &w,
        &format!("GET /1 HTTP/1.1\r\n{host}\r\nGET /2 HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert_eq!(lower.matches("http/1.1 200").count(), 2, "{answer}");
    assert_eq!(
        lower.matches("\r\nconnection: close").count(),
        1,
        "{answer}"
    );
    let second = lower.rfind("http/1.1 200").unwrap();
    assert!(
        lower[second..].contains("\r\nconnection: close"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_tcp_ports() {
    let w = world().await;

    // HTTP/2 (prior knowledge) on a sniffed port: the backend is spoken to in HTTP/2 too.
    let io = TokioIo::new(w.tunnel(SocketAddr::new(VIP.into(), 8080)).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = Request::builder()
            .uri("http://echo.demo.svc.cluster.local:8080/h2")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let answer = Answer::read(sender.send_request(request).await.unwrap()).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body["version"], "HTTP/2.0");
        assert_eq!(answer.body["host"], "echo.demo.svc.cluster.local:8080");
    }

    // A declared TCP port is never sniffed: the server speaks first and the client hears it.
    let mut stream = w.tunnel(SocketAddr::new(VIP.into(), 25)).await;
    let mut greeting = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut greeting))
        .await
        .expect("greeting in time")
        .unwrap();
    assert_eq!(&greeting[..n], b"220 hello from smtp-like\r\n");
    stream.write_all(b"EHLO me\r\n").await.unwrap();
    let n = tokio::time::timeout(WAIT, stream.read(&mut greeting))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&greeting[..n], b"EHLO me\r\n");
    // While it is open, the waypoint lists it as ztunnel lists its connections: the client, the
    // address the tunnel named, the endpoint chosen, the client's identity and bytes so far.
    let open = w.proxy.connections().snapshot();
    assert_eq!(open.len(), 1, "{open:?}");
    let dumped = ambit_telemetry::dump::connection(&open[0], std::time::SystemTime::now());
    assert_eq!(dumped["originalDst"], format!("{VIP}:25"), "{dumped}");
    let actual = dumped["actualDst"].as_str().unwrap_or_default();
    assert!(
        actual.ends_with(&format!(":{}", w.backend_port + 1)),
        "{dumped}"
    );
    assert_eq!(
        dumped["peerIdentity"],
        w.client_cert.identity().to_string(),
        "{dumped}"
    );
    assert_eq!(dumped["bytesReceived"], 9, "{dumped}");
    assert_eq!(dumped["bytesSent"], 26 + 9, "{dumped}");
    drop(stream);
    ambit_wait(|| w.proxy.connections().is_empty())
        .await
        .unwrap_or_else(|()| panic!("the closed connection is still listed"));
    let text = w.registry.render();
    ambit_wait(|| {
        w.registry.render().lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"waypoint\"")
        })
    })
    .await
    .unwrap_or_else(|()| panic!("no closed TCP connection counted:\n{text}"));
}

async fn ambit_wait(mut check: impl FnMut() -> bool) -> Result<(), ()> {
    for _ in 0..100 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_timeout_and_upgrade() {
    let w = world().await;
    w.set_routes(
        &[route(vec![
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/mirror"),
                    ..Default::default()
                }],
                filters: vec![filter(wp::filter::Kind::RequestMirror(wp::RequestMirror {
                    backend: Some(backend(ECHO_V2, 1)),
                    numerator: 0,
                    denominator: 0,
                }))],
                backends: vec![backend(ECHO_V1, 1)],
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    path: prefix("/slow"),
                    ..Default::default()
                }],
                backends: vec![backend(ECHO_V1, 1)],
                timeouts: Some(wp::Timeouts {
                    request: None,
                    backend_request: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 200_000_000,
                    }),
                }),
                ..Default::default()
            },
            wp::Rule {
                backends: vec![backend(ECHO_V1, 1)],
                ..Default::default()
            },
        ])],
        &[],
    );

    // The mirror gets a copy; the client gets the real backend's answer.
    let before = w.v2_hits.load(Ordering::SeqCst);
    let answer = w.get_path("/mirror", &[]).await;
    assert_eq!(answer.backend(), "v1", "{}", answer.text);
    ambit_wait(|| w.v2_hits.load(Ordering::SeqCst) > before)
        .await
        .unwrap_or_else(|()| panic!("the mirror never received the copy"));

    // backendRequest: a slow backend is cut with 504 and flag UT; a fast one answers.
    let answer = w.get_path("/slow", &[("x-delay-ms", "3000")]).await;
    assert_eq!(answer.status, 504, "{}", answer.text);
    assert_eq!(answer.headers["x-ambit-response-flags"], "UT");
    let answer = w.get_path("/slow", &[("x-delay-ms", "10")]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Upgrade (WebSocket-style) passes through: 101, then bytes both ways.
    let io = TokioIo::new(w.tunnel(SocketAddr::new(VIP.into(), 80)).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let request = Request::builder()
        .uri("/ws")
        .header("host", "echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut upgraded = TokioIo::new(upgraded);
    upgraded.write_all(b"ping over the upgrade").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, upgraded.read(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf[..n], b"ping over the upgrade");
}

fn flaky_route(rule: wp::Rule) -> wp::Route {
    wp::Route {
        namespace: "demo".into(),
        name: "flaky".into(),
        parents: vec![wp::ParentRef {
            service: FLAKY.into(),
            port: 80,
        }],
        rules: vec![rule],
        ..Default::default()
    }
}

fn seconds(s: i64, ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: ms * 1_000_000,
    })
}

impl World {
    async fn flaky(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut builder = Request::builder()
            .uri(path)
            .header("host", "flaky.demo.svc.cluster.local");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.get(
            SocketAddr::new(FLAKY_VIP.into(), 80),
            builder.body(Empty::new()).unwrap(),
        )
        .await
    }
}

/// Issue 13's progress under failure: one of three backends always answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_outlier_detection_timeouts_faults_and_pools() {
    let w = world().await;
    let to_flaky = |weight| wp::Backend {
        service: FLAKY.into(),
        port: 80,
        weight,
        ..Default::default()
    };

    // Three retries on 503: the client sees success (>= 99% over 150 requests), and those
    // that needed no retry never touched the bad pod twice.
    w.set_routes(
        &[flaky_route(wp::Rule {
            backends: vec![to_flaky(1)],
            retry: Some(wp::Retry {
                attempts: 3,
                codes: vec![503],
                backoff: seconds(0, 1),
                ..Default::default()
            }),
            ..Default::default()
        })],
        &[],
    );
    let mut ok = 0;
    for _ in 0..150 {
        if w.flaky("/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 149, "{ok} of 150 succeeded with three retries");

    // Outlier detection, retries off: after three 503s in a row the bad pod is ejected; of the
    // next 100 requests at least 98 succeed, and the ejection is counted.
    let policy = wp::DestinationPolicy {
        namespace: "demo".into(),
        name: "flaky".into(),
        service: FLAKY.into(),
        traffic_policy: Some(wp::TrafficPolicy {
            outlier_detection: Some(wp::OutlierDetection {
                consecutive_5xx_errors: 3,
                interval: seconds(30, 0),
                base_ejection_time: seconds(60, 0),
                enabled: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        subsets: vec![wp::Subset {
            name: "v2-only".into(),
            workloads: vec!["Kubernetes//Pod/demo/echo-v2".into()],
            traffic_policy: None,
        }],
        ..Default::default()
    };
    w.set_l7(
        &[flaky_route(wp::Rule {
            backends: vec![to_flaky(1)],
            ..Default::default()
        })],
        &[],
        std::slice::from_ref(&policy),
    );
    // Until the bad pod has failed three times in a row it takes its share (bounded loop).
    for _ in 0..60 {
        w.flaky("/", &[]).await;
        if w.registry
            .render()
            .contains("ambit_waypoint_outlier_ejections_total{")
        {
            break;
        }
    }
    assert!(
        w.registry
            .render()
            .contains("ambit_waypoint_outlier_ejections_total{destination_service=\"flaky.demo.svc.cluster.local\"} 1"),
        "no ejection counted:\n{}",
        w.registry.render()
    );
    let mut ok = 0;
    for _ in 0..100 {
        if w.flaky("/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 98, "{ok} of 100 succeeded after the ejection");

    // A subset: only its workloads answer.
    w.set_l7(
        &[flaky_route(wp::Rule {
            backends: vec![wp::Backend {
                subset: "v2-only".into(),
                ..to_flaky(1)
            }],
            ..Default::default()
        })],
        &[],
        std::slice::from_ref(&policy),
    );
    for _ in 0..10 {
        assert_eq!(w.flaky("/", &[]).await.backend(), "v2");
    }

    // A backend that hangs is cut by perTryTimeout and the request succeeds on another; a
    // route timeout answers 504 on time.
    w.set_routes(
        &[route(vec![wp::Rule {
            backends: vec![backend(ECHO_V1, 1)],
            retry: Some(wp::Retry {
                attempts: 2,
                per_try_timeout: seconds(0, 200),
                retry_on: vec!["5xx".into()],
                backoff: seconds(0, 1),
                ..Default::default()
            }),
            ..Default::default()
        }])],
        &[],
    );
    // Every try hangs here: each is cut at 200 ms and the client gets 504 UT.
    let answer = w.get_path("/", &[("x-delay-ms", "30000")]).await;
    assert_eq!(answer.status, 504, "{}", answer.text);
    assert!(
        answer.headers["x-ambit-response-flags"]
            .to_str()
            .unwrap()
            .contains("UT"),
        "{:?}",
        answer.headers
    );
    // One pod of three hangs: a try that lands on it is cut and the request succeeds on another.
    w.set_routes(
        &[flaky_route(wp::Rule {
            backends: vec![to_flaky(1)],
            retry: Some(wp::Retry {
                attempts: 3,
                per_try_timeout: seconds(0, 200),
                retry_on: vec!["5xx".into()],
                backoff: seconds(0, 1),
                ..Default::default()
            }),
            ..Default::default()
        })],
        &[],
    );
    for _ in 0..15 {
        let answer = w.flaky("/", &[("x-bad-hangs", "1")]).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }

    // Fault injection: an abort of 50% of requests lands within a tolerance.
    w.set_routes(
        &[route(vec![wp::Rule {
            backends: vec![backend(ECHO_V1, 1)],
            fault: Some(wp::Fault {
                abort_http_status: 418,
                abort_percent: 50.0,
                ..Default::default()
            }),
            ..Default::default()
        }])],
        &[],
    );
    let mut aborted = 0;
    for _ in 0..200 {
        let answer = w.get_path("/", &[]).await;
        if answer.status == 418 {
            assert_eq!(answer.headers["x-ambit-response-flags"], "FI");
            aborted += 1;
        }
    }
    // Binomial(200, 0.5): outside [70, 130] with probability below 1e-4.
    assert!((70..=130).contains(&aborted), "{aborted} of 200 aborted");

    // Connection-pool overflow answers 503 UO at once instead of queueing.
    let limited = wp::DestinationPolicy {
        namespace: "demo".into(),
        name: "echo-v1".into(),
        service: ECHO_V1.into(),
        traffic_policy: Some(wp::TrafficPolicy {
            connection_pool: Some(wp::ConnectionPool {
                max_connections: 1,
                http1_max_pending_requests: 0,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    w.set_l7(
        &[route(vec![wp::Rule {
            backends: vec![backend(ECHO_V1, 1)],
            ..Default::default()
        }])],
        &[],
        &[limited],
    );
    let slow = w.get_path("/", &[("x-delay-ms", "1500")]);
    let quick = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.get_path("/", &[]).await
    };
    let (slow, quick) = tokio::join!(slow, quick);
    assert_eq!(slow.status, 200, "{}", slow.text);
    assert_eq!(quick.status, 503, "{}", quick.text);
    assert_eq!(quick.headers["x-ambit-response-flags"], "UO");
}

/// The requests each connection the v1 backend accepted since `from` carried, and whether it
/// is closed.
fn v1_connections(w: &World, from: usize) -> Vec<(usize, bool)> {
    w.v1_connections.lock().unwrap()[from..]
        .iter()
        .map(|c| {
            (
                c.requests.load(Ordering::SeqCst),
                c.closed.load(Ordering::SeqCst),
            )
        })
        .collect()
}

fn pool_policy(service: &str, pool: wp::ConnectionPool) -> wp::DestinationPolicy {
    wp::DestinationPolicy {
        namespace: "demo".into(),
        name: "pool".into(),
        service: service.into(),
        traffic_policy: Some(wp::TrafficPolicy {
            connection_pool: Some(pool),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// DestinationRule connectionPool settings that shape upstream connections, seen from the
/// backend: how many connections it accepted, how many requests each carried, which were closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_connect_timeout_requests_per_connection_and_idle_timeout() {
    let w = world().await;
    let to_v1 = [route(vec![wp::Rule {
        backends: vec![backend(ECHO_V1, 1)],
        ..Default::default()
    }])];

    // maxRequestsPerConnection 3, HTTP/1.1 and (h2UpgradePolicy UPGRADE) HTTP/2: nine requests
    // in a row open at least three connections, none carries more than three.
    for h2 in [false, true] {
        w.set_l7(
            &to_v1,
            &[],
            &[pool_policy(
                ECHO_V1,
                wp::ConnectionPool {
                    max_requests_per_connection: 3,
                    h2_upgrade: h2,
                    ..Default::default()
                },
            )],
        );
        let before = w.v1_connections.lock().unwrap().len();
        for _ in 0..9 {
            let answer = w.get_path("/", &[]).await;
            assert_eq!(answer.status, 200, "{}", answer.text);
            assert_eq!(answer.backend(), "v1");
            let version = if h2 { "HTTP/2.0" } else { "HTTP/1.1" };
            assert_eq!(answer.body["version"], version);
        }
        let seen = v1_connections(&w, before);
        assert!(seen.len() >= 3, "h2 {h2}: {seen:?}");
        assert!(seen.iter().all(|(n, _)| *n <= 3), "h2 {h2}: {seen:?}");
        assert_eq!(
            seen.iter().map(|(n, _)| n).sum::<usize>(),
            9,
            "h2 {h2}: {seen:?}"
        );
        // A connection is retired (closed) once it carried its third request.
        let retired = ambit_wait(|| {
            v1_connections(&w, before)
                .iter()
                .all(|(n, closed)| *n < 3 || *closed)
        })
        .await;
        assert!(retired.is_ok(), "h2 {h2}: {:?}", v1_connections(&w, before));
    }

    // idleTimeout: the waypoint closes an upstream connection that carried nothing for that
    // long (HTTP/1.1 idle in the pool, and an HTTP/2 connection with no stream in flight); the
    // next request opens a new one.
    for h2 in [false, true] {
        w.set_l7(
            &to_v1,
            &[],
            &[pool_policy(
                ECHO_V1,
                wp::ConnectionPool {
                    idle_timeout: seconds(0, 300),
                    h2_upgrade: h2,
                    ..Default::default()
                },
            )],
        );
        assert_eq!(w.get_path("/", &[]).await.status, 200);
        // Every connection the backend ever accepted ends up closed (the one just used too).
        let closed = ambit_wait(|| v1_connections(&w, 0).iter().all(|(_, closed)| *closed)).await;
        assert!(closed.is_ok(), "h2 {h2}: {:?}", v1_connections(&w, 0));
        let before = w.v1_connections.lock().unwrap().len();
        assert_eq!(w.get_path("/", &[]).await.status, 200);
        assert_eq!(v1_connections(&w, before).len(), 1, "h2 {h2}");
    }

    // connectTimeout: a pod whose tunnel never opens answers 503 UF once the timeout passes
    // (without it, the request would wait for the pod).
    w.set_l7(
        &[],
        &[],
        &[pool_policy(
            HANG,
            wp::ConnectionPool {
                connect_timeout: seconds(0, 200),
                ..Default::default()
            },
        )],
    );
    let answer = w
        .get(
            SocketAddr::new(HANG_VIP.into(), 80),
            Request::builder()
                .uri("/")
                .header("host", "hang.demo.svc.cluster.local")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.headers["x-ambit-response-flags"], "UF");
    assert!(answer.text.contains("connect timeout"), "{}", answer.text);
}

/// A Python with `opentelemetry-proto` and `oteltap` (see tests/support/otlp_python.rs).
fn otlp_python() -> std::path::PathBuf {
    otlp_python::otlp_python(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("otlp-venv"))
}

/// The OTLP receiver: its port, and the spans it decoded so far (one JSON object each).
struct Receiver {
    port: u16,
    spans: Arc<std::sync::Mutex<Vec<Value>>>,
    child: std::process::Child,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn otlp_receiver() -> Receiver {
    use std::io::BufRead;
    // The lab's collector (ambitctl lab up runs it too).
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ambitctl/src/lab/otlp_collector.py"
    );
    let mut child = std::process::Command::new(otlp_python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the OTLP receiver starts");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines
        .next()
        .expect("a first line")
        .expect("the first line reads");
    let port: u16 = first
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = spans.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let value: Value = serde_json::from_str(&line).unwrap_or(json!({"error": line}));
            sink.lock().unwrap().push(value);
        }
    });
    Receiver { port, spans, child }
}

/// Issue 13 item 6: spans reach a real OTLP receiver with the incoming trace continued, Istio's
/// attributes, the status, and a client span per upstream try that the backend sees as parent.
/// A world whose waypoint exports its spans to an OTLP receiver on `port`, configured the way the
/// waypoint's own configuration reads it (the OTel variable names the collector; sampling 0
/// starts no trace of its own, so only the client's sampled traces are recorded), with every
/// request of the Service routed to v1; and the registry the tracer counts its spans in.
async fn traced_world(port: u16) -> (World, Registry) {
    let env: BTreeMap<String, String> = [
        ("POD_NAME", "waypoint-7d9f"),
        ("POD_NAMESPACE", "demo"),
        ("GATEWAY_NAME", "waypoint"),
        ("INSTANCE_IP", "127.0.0.1"),
        ("TRACE_SAMPLING", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([(
        "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
        format!("http://127.0.0.1:{port}"),
    )])
    .collect();
    let config = waypoint::config::from_env(&env, &BTreeMap::new()).expect("configuration");
    let registry = Registry::new();
    let (tracer, exporter) = waypoint::tracing::Tracer::new(&config.tracing, &registry);
    tokio::spawn(exporter.expect("an exporter").run());
    let w = world_with(tracer).await;
    w.set_routes(
        &[route(vec![wp::Rule {
            backends: vec![backend(ECHO_V1, 1)],
            ..Default::default()
        }])],
        &[],
    );
    (w, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_the_clients_trace_and_istios_attributes() {
    let receiver = otlp_receiver();
    let (w, registry) = traced_world(receiver.port).await;

    const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    // Not sampled here (no traceparent, sampling 0): no span.
    assert_eq!(w.get_path("/untraced", &[]).await.status, 200);
    let ok = w
        .get_path(
            "/hello?x=1",
            &[
                ("traceparent", &format!("00-{TRACE_A}-{CLIENT_SPAN}-01")),
                ("x-request-id", "req-a"),
                ("user-agent", "curl/8"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    // The backend's parent is the waypoint's span, in the client's trace.
    let seen = ok.body["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(seen.starts_with(&format!("00-{TRACE_A}-")), "{seen}");
    assert!(
        seen.ends_with("-01") && !seen.contains(CLIENT_SPAN),
        "{seen}"
    );
    let failed = w
        .get_path(
            "/status/503",
            &[("traceparent", &format!("00-{TRACE_B}-{CLIENT_SPAN}-01"))],
        )
        .await;
    assert_eq!(failed.status, 503);

    // The exporter flushes every second: wait (bounded) for both traces' two spans each.
    let mut spans = Vec::new();
    for _ in 0..200 {
        spans = receiver.spans.lock().unwrap().clone();
        if spans.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        spans.iter().all(|s| s.get("error").is_none()),
        "receiver errors: {spans:#?}"
    );
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |trace: &str, kind: i64| {
        spans
            .iter()
            .find(|s| s["trace_id"] == trace && s["kind"] == kind)
            .unwrap_or_else(|| panic!("no kind {kind} span in trace {trace}: {spans:#?}"))
            .clone()
    };
    let server = find(TRACE_A, 2);
    let client = find(TRACE_A, 3);
    assert_eq!(server["service"], "waypoint.demo");
    assert_eq!(server["parent_span_id"], CLIENT_SPAN);
    assert_eq!(server["name"], "echo.demo.svc.cluster.local:80/*");
    assert_eq!(server["status"], 0, "UNSET for a success");
    let a = &server["attributes"];
    for (key, expected) in [
        ("component", json!("proxy")),
        ("http.method", json!("GET")),
        ("http.status_code", json!(200)),
        (
            "http.url",
            json!("http://echo.demo.svc.cluster.local/hello?x=1"),
        ),
        ("http.protocol", json!("HTTP/1.1")),
        ("guid:x-request-id", json!("req-a")),
        ("user_agent", json!("curl/8")),
        ("response_flags", json!("-")),
        (
            "upstream_cluster",
            json!("inbound-vip|80|http|echo-v1.demo.svc.cluster.local"),
        ),
        ("istio.canonical_service", json!("waypoint")),
        ("istio.namespace", json!("demo")),
        ("istio.mesh_id", json!("cluster.local")),
        (
            "node_id",
            json!("waypoint~127.0.0.1~waypoint-7d9f.demo~demo.svc.cluster.local"),
        ),
    ] {
        assert_eq!(a[key], expected, "{key} in {a:#}");
    }
    assert!(a["response_size"].as_i64().unwrap() > 0, "{a:#}");
    // The client span is the server span's child, and the backend's parent.
    assert_eq!(client["parent_span_id"], server["span_id"]);
    assert_eq!(
        seen,
        format!("00-{TRACE_A}-{}-01", client["span_id"].as_str().unwrap())
    );
    assert_eq!(client["attributes"]["http.status_code"], 200);
    assert_eq!(
        client["attributes"]["upstream_cluster"],
        "inbound-vip|80|http|echo-v1.demo.svc.cluster.local"
    );

    // A 5xx is an error span.
    let server = find(TRACE_B, 2);
    assert_eq!(server["attributes"]["http.status_code"], 503);
    assert_eq!(server["attributes"]["error"], true);
    assert_eq!(server["status"], 2, "ERROR");
    assert!(
        registry
            .render()
            .contains("ambit_waypoint_spans_exported_total 4"),
        "{}",
        registry.render()
    );
}

/// Issue 13 item 6, against a receiver nobody here wrote: `oteltap` (PyPI), an OTLP/HTTP
/// receiver that prints every span it decodes as a JSON line, takes the waypoint's export and
/// shows the client's trace continued, the parent, the span's name, kind and attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_otlp_receiver_decodes_the_waypoints_spans() {
    use std::io::BufRead;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = std::process::Command::new(otlp_python())
        .args(["-m", "oteltap", "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("oteltap starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let _child = Kill(child);
    let first = lines.next().expect("a first line").expect("readable");
    assert!(first.starts_with("Listening"), "{first}");
    let spans = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let sink = spans.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(span) = serde_json::from_str::<Value>(&line) {
                sink.lock().unwrap().push(span);
            }
        }
    });

    let (w, _registry) = traced_world(port).await;
    const TRACE: &str = "5b8efff798038103d269b633813fc60c";
    const CLIENT_SPAN: &str = "eee19b7ec3c1b174";
    let ok = w
        .get_path(
            "/peer",
            &[("traceparent", &format!("00-{TRACE}-{CLIENT_SPAN}-01"))],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);

    // Bounded wait for the exporter's batch (every second) to be decoded and printed.
    let mut server = None;
    for _ in 0..200 {
        server = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s["traceId"] == TRACE && s["kind"] == 2)
            .cloned();
        if server.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = server.unwrap_or_else(|| {
        panic!(
            "oteltap printed no server span of trace {TRACE}: {:#?}",
            spans.lock().unwrap()
        )
    });
    assert_eq!(server["parentSpanId"], CLIENT_SPAN, "{server:#}");
    assert_eq!(
        server["name"], "echo.demo.svc.cluster.local:80/*",
        "{server:#}"
    );
    let attribute = |key: &str| {
        server["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|kv| kv["key"] == key))
            .map(|kv| kv["value"].clone())
            .unwrap_or_else(|| panic!("no attribute {key} in {server:#}"))
    };
    assert_eq!(attribute("http.method"), json!({"stringValue": "GET"}));
    assert_eq!(attribute("component"), json!({"stringValue": "proxy"}));
    let status = attribute("http.status_code");
    assert!(
        status["intValue"] == "200" || status["intValue"] == 200,
        "{status}"
    );
    // The client span of the try, the server span's child, in the same trace.
    let child_of_server =
        spans.lock().unwrap().iter().any(|s| {
            s["traceId"] == TRACE && s["kind"] == 3 && s["parentSpanId"] == server["spanId"]
        });
    assert!(child_of_server, "{:#?}", spans.lock().unwrap());
}
