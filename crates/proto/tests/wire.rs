//! Wire-compatibility tests: our messages must produce and accept the exact bytes Istio ambient
//! peers do. Expected encodings are written by hand from the field numbers in the wire reference,
//! one field at a time so that the check does not depend on prost's field ordering.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use ambit_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambit_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ambit_proto::envoy_core::Node;
use ambit_proto::google_rpc::Status;
use ambit_proto::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};
use ambit_proto::workload::{
    Address, GatewayAddress, NamespacedHostname, Port, PortList, Service, TunnelProtocol, Workload,
    address, gateway_address,
};
use ambit_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, ZdsHello,
    workload_request,
};
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, UnpackError, pack_any, unpack_any};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use prost::{Message, Name};
use prost_types::{Struct, Value, value};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response};

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

const CA_METHOD_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
const ADS_METHOD_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

fn encoded<M: Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// istio.workload
// ---------------------------------------------------------------------------------------------

#[test]
fn workload_uid_is_field_20() {
    let w = Workload {
        uid: "u1".into(),
        ..Default::default()
    };
    // (20 << 3) | 2 = 162 = varint A2 01.
    assert_eq!(encoded(&w), b"\xa2\x01\x02u1");
}

#[test]
fn workload_node_is_field_9() {
    let w = Workload {
        node: "kind-worker".into(),
        ..Default::default()
    };
    assert_eq!(encoded(&w), b"\x4a\x0bkind-worker");
}

#[test]
fn workload_services_map_is_field_22() {
    let mut services = HashMap::new();
    services.insert(
        "ns/h".to_string(),
        PortList {
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
        },
    );
    let w = Workload {
        services,
        ..Default::default()
    };
    // Port: 08 50 (80), 10 90 3F (8080) = 5 bytes; PortList: 0A 05 <port> = 7 bytes;
    // entry: 0A 04 "ns/h" 12 07 <portlist> = 15 bytes; field 22: B2 01 0F <entry>.
    let expected = [
        &b"\xb2\x01\x0f"[..],
        b"\x0a\x04ns/h",
        b"\x12\x07",
        b"\x0a\x05",
        b"\x08\x50\x10\x90\x3f",
    ]
    .concat();
    assert_eq!(encoded(&w), expected);
}

#[test]
fn workload_addresses_and_tunnel_protocol() {
    let w = Workload {
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let bytes = encoded(&w);
    // Field 3 repeated bytes, field 5 enum.
    assert_eq!(bytes, b"\x1a\x04\x0a\x00\x00\x01\x28\x01");
}

#[test]
fn workload_decodes_from_field_number_order() {
    // uid=20, name=1, namespace=2, node=9, waypoint=8 (hostname form), services=22,
    // written in field-number order as a Go peer would, plus an unknown field 99 to skip.
    let bytes = [
        &b"\x0a\x03pod"[..],
        b"\x12\x07default",
        b"\x42\x10",
        b"\x0a\x0b\x0a\x02ns\x12\x05wp.ns",
        b"\x18\xa0\x75",
        b"\x4a\x04node",
        b"\xa2\x01\x03uid",
        b"\xb2\x01\x0a\x0a\x04ns/h\x12\x02\x0a\x00",
        b"\x9a\x06\x01x",
    ]
    .concat();
    let w = Workload::decode(bytes.as_slice()).expect("valid encoding");
    assert_eq!(w.uid, "uid");
    assert_eq!(w.name, "pod");
    assert_eq!(w.namespace, "default");
    assert_eq!(w.node, "node");
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "ns".into(),
                hostname: "wp.ns".into(),
            })),
            hbone_mtls_port: 15008,
        })
    );
    assert_eq!(w.services["ns/h"].ports, vec![Port::default()]);
}

#[test]
fn address_wraps_workload_in_field_1_and_service_in_field_2() {
    let workload = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "u".into(),
            ..Default::default()
        })),
    };
    assert_eq!(encoded(&workload), b"\x0a\x04\xa2\x01\x01u");
    assert_eq!(workload.resource_name().as_deref(), Some("u"));

    let service = Address {
        r#type: Some(address::Type::Service(Service {
            namespace: "ns".into(),
            hostname: "h".into(),
            ..Default::default()
        })),
    };
    assert_eq!(encoded(&service), b"\x12\x07\x12\x02ns\x1a\x01h");
    assert_eq!(service.resource_name().as_deref(), Some("ns/h"));
    assert_eq!(Address::default().resource_name(), None);
}

// ---------------------------------------------------------------------------------------------
// istio.workload.zds
// ---------------------------------------------------------------------------------------------

#[test]
fn zds_hello_v1() {
    let hello = ZdsHello { version: 1 };
    assert_eq!(encoded(&hello), b"\x08\x01");
}

#[test]
fn del_workload_uid_is_field_2() {
    let del = DelWorkload { uid: "p".into() };
    assert_eq!(encoded(&del), b"\x12\x01p");
    let request = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(del)),
    };
    assert_eq!(encoded(&request), b"\x12\x03\x12\x01p");
}

#[test]
fn workload_request_keep_is_field_5() {
    let request = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(KeepWorkload {
            uid: "k".into(),
        })),
    };
    assert_eq!(encoded(&request), b"\x2a\x03\x0a\x01k");
}

#[test]
fn workload_request_snapshot_sent_is_present_even_though_empty() {
    let request = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    assert_eq!(encoded(&request), b"\x1a\x00");
    let back = WorkloadRequest::decode(&b"\x1a\x00"[..]).expect("valid encoding");
    assert_eq!(back, request);
}

#[test]
fn add_workload_decodes_and_skips_reserved_trust_domain() {
    // AddWorkload{uid=1, workload_info=2{name=1, namespace=2, service_account=3, 4=old td}}
    let info = [
        &b"\x0a\x01a"[..],
        b"\x12\x02ns",
        b"\x1a\x02sa",
        b"\x22\x02td",
    ]
    .concat();
    let mut add = b"\x0a\x03pid\x12".to_vec();
    add.push(u8::try_from(info.len()).expect("short"));
    add.extend_from_slice(&info);
    let mut request = b"\x0a".to_vec();
    request.push(u8::try_from(add.len()).expect("short"));
    request.extend_from_slice(&add);

    let decoded = WorkloadRequest::decode(request.as_slice()).expect("valid encoding");
    let expected = WorkloadRequest {
        payload: Some(workload_request::Payload::Add(AddWorkload {
            uid: "pid".into(),
            workload_info: Some(WorkloadInfo {
                name: "a".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    };
    assert_eq!(decoded, expected);
}

// ---------------------------------------------------------------------------------------------
// istio.security
// ---------------------------------------------------------------------------------------------

#[test]
fn match_destination_ports_is_packed_field_9() {
    let m = Match {
        destination_ports: vec![80, 443],
        ..Default::default()
    };
    assert_eq!(encoded(&m), b"\x4a\x03\x50\xbb\x03");
    // A decoder must also accept the unpacked form.
    let unpacked = Match::decode(&b"\x48\x50\x48\xbb\x03"[..]).expect("valid encoding");
    assert_eq!(unpacked.destination_ports, vec![80, 443]);
}

#[test]
fn authorization_rules_are_field_5() {
    let policy = Authorization {
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    // Match 4A 01 50; Clause 12 03 <match>; Rule 0A 05 <clause>; rules 2A 07 <rule>.
    let expected = b"\x18\x01\x20\x01\x2a\x07\x0a\x05\x12\x03\x4a\x01\x50";
    assert_eq!(encoded(&policy), expected);
    assert_eq!(
        Authorization::decode(&expected[..]).expect("valid encoding"),
        policy
    );
}

#[test]
fn string_match_presence_and_service_accounts() {
    let m = Match {
        not_principals: vec![StringMatch {
            match_type: Some(string_match::MatchType::Presence(())),
        }],
        ..Default::default()
    };
    // not_principals=4 holding StringMatch{presence=4 (empty)}.
    assert_eq!(encoded(&m), b"\x22\x02\x22\x00");

    let decoded = Match::decode(&b"\x5a\x07\x0a\x01n\x12\x02sa"[..]).expect("valid encoding");
    assert_eq!(decoded.service_accounts[0].namespace, "n");
    assert_eq!(decoded.service_accounts[0].service_account, "sa");
}

// ---------------------------------------------------------------------------------------------
// istio.v1.auth
// ---------------------------------------------------------------------------------------------

fn impersonation_metadata(identity: &str) -> Struct {
    Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(value::Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    }
}

#[test]
fn certificate_request_metadata_is_field_4() {
    let request = IstioCertificateRequest {
        csr: String::new(),
        validity_duration: 86400,
        metadata: Some(impersonation_metadata("spiffe://cluster.local/ns/a/sa/b")),
    };
    // validity_duration=3: 18 80 A3 05. metadata=4: Struct{fields=1: entry{key=1, value=2:
    // Value{string_value=3}}}.
    let expected = [
        &b"\x18\x80\xa3\x05"[..],
        b"\x22\x3c",
        b"\x0a\x3a",
        b"\x0a\x14ImpersonatedIdentity",
        b"\x12\x22\x1a\x20spiffe://cluster.local/ns/a/sa/b",
    ]
    .concat();
    assert_eq!(encoded(&request), expected);
}

#[test]
fn certificate_response_chain_decodes() {
    let response =
        IstioCertificateResponse::decode(&b"\x0a\x04leaf\x0a\x04root"[..]).expect("valid");
    assert_eq!(response.cert_chain, vec!["leaf", "root"]);
}

// ---------------------------------------------------------------------------------------------
// envoy delta xDS
// ---------------------------------------------------------------------------------------------

#[test]
fn delta_request_initial_versions_is_field_5() {
    let request = DeltaDiscoveryRequest {
        initial_resource_versions: [("a".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(encoded(&request), b"\x2a\x06\x0a\x01a\x12\x011");
}

#[test]
fn delta_request_nack_fields() {
    let nack = DeltaDiscoveryRequest {
        type_url: "t".into(),
        response_nonce: "n".into(),
        error_detail: Some(Status {
            code: 3,
            message: "x".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    // type_url=2, response_nonce=6, error_detail=7: Status{code=1, message=2}.
    assert_eq!(
        encoded(&nack),
        b"\x12\x01t\x32\x01n\x3a\x05\x08\x03\x12\x01x"
    );
}

#[test]
fn delta_request_subscribe_and_node() {
    let request = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local".into(),
            user_agent_name: "z".into(),
            ..Default::default()
        }),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    };
    let expected = [
        &b"\x0a\x2e"[..],
        b"\x0a\x29ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local",
        b"\x32\x01z",
        b"\x1a\x01*",
        b"\x22\x01*",
    ]
    .concat();
    assert_eq!(encoded(&request), expected);
}

#[test]
fn delta_response_decodes() {
    // system_version_info=1, resources=2 {version=1, resource=2 Any{type_url=1, value=2},
    // name=3}, type_url=4, nonce=5, removed_resources=6.
    let any = [&b"\x0a\x01T"[..], b"\x12\x02\x08\x01"].concat();
    let mut resource = b"\x0a\x02v1\x12".to_vec();
    resource.push(u8::try_from(any.len()).expect("short"));
    resource.extend_from_slice(&any);
    resource.extend_from_slice(b"\x1a\x01r");
    let mut bytes = b"\x0a\x03sys\x12".to_vec();
    bytes.push(u8::try_from(resource.len()).expect("short"));
    bytes.extend_from_slice(&resource);
    bytes.extend_from_slice(b"\x22\x01T\x2a\x02n1\x32\x04gone");

    let response = DeltaDiscoveryResponse::decode(bytes.as_slice()).expect("valid encoding");
    assert_eq!(response.system_version_info, "sys");
    assert_eq!(response.type_url, "T");
    assert_eq!(response.nonce, "n1");
    assert_eq!(response.removed_resources, vec!["gone"]);
    assert_eq!(
        response.resources,
        vec![Resource {
            version: "v1".into(),
            resource: Some(prost_types::Any {
                type_url: "T".into(),
                value: vec![0x08, 0x01],
            }),
            name: "r".into(),
            aliases: vec![],
            ttl: None,
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// Any helpers and type URLs
// ---------------------------------------------------------------------------------------------

#[test]
fn type_urls_match_the_xds_constants() {
    assert_eq!(Address::type_url(), ADDRESS_TYPE_URL);
    assert_eq!(Authorization::type_url(), AUTHORIZATION_TYPE_URL);
}

#[test]
fn any_round_trip_with_xds_type_urls() {
    let address = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "Kubernetes//Pod/default/foo".into(),
            addresses: vec![vec![10, 0, 0, 7]],
            ..Default::default()
        })),
    };
    let any = pack_any(&address);
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    assert_eq!(any.value, address.encode_to_vec());
    assert_eq!(unpack_any::<Address>(&any).expect("same type"), address);

    let policy = Authorization {
        name: "deny-all".into(),
        namespace: "default".into(),
        action: Action::Deny as i32,
        ..Default::default()
    };
    assert_eq!(policy.resource_name(), "default/deny-all");
    let any = pack_any(&policy);
    assert_eq!(any.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(
        unpack_any::<Authorization>(&any).expect("same type"),
        policy
    );
}

#[test]
fn unpack_rejects_wrong_type_and_bad_bytes() {
    let any = pack_any(&Authorization::default());
    let err = unpack_any::<Address>(&any).expect_err("wrong type");
    assert!(matches!(err, UnpackError::TypeMismatch { .. }));
    assert_eq!(
        err.to_string(),
        "protobuf Any has type URL \"type.googleapis.com/istio.security.Authorization\" but \
         \"type.googleapis.com/istio.workload.Address\" was expected; the sender put a \
         different resource type on this stream"
    );

    let truncated = prost_types::Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: vec![0x0a, 0x05, 0xa2],
    };
    let err = unpack_any::<Address>(&truncated).expect_err("truncated");
    assert!(matches!(err, UnpackError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("istio.workload.Address"), "{err}");

    // Any host prefix is acceptable per the protobuf spec; only the type name must match.
    let other_host = prost_types::Any {
        type_url: "example.com/istio.workload.Address".into(),
        value: vec![],
    };
    assert_eq!(
        unpack_any::<Address>(&other_host).expect("same type name"),
        Address::default()
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC services on loopback
// ---------------------------------------------------------------------------------------------

/// A CA that "signs" by echoing the CSR and the requested identity into the chain.
struct EchoCa;

#[tonic::async_trait]
impl IstioCertificateService for EchoCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, tonic::Status> {
        let request = request.into_inner();
        let identity = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![
                format!(
                    "leaf:{}:{}:{}",
                    request.csr, identity, request.validity_duration
                ),
                "root".into(),
            ],
        }))
    }
}

type DeltaStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

/// An ADS server answering each request with one response naming its type URL, and carrying
/// one packed Address resource.
struct EchoAds;

#[tonic::async_trait]
impl AggregatedDiscoveryService for EchoAds {
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, tonic::Status> {
        let requests = request.into_inner();
        let responses = requests.map(|item| {
            let req = item?;
            let address = Address {
                r#type: Some(address::Type::Workload(Workload {
                    uid: "Kubernetes//Pod/default/foo".into(),
                    ..Default::default()
                })),
            };
            Ok(DeltaDiscoveryResponse {
                type_url: req.type_url,
                nonce: format!("nonce-{}", req.resource_names_subscribe.len()),
                resources: vec![Resource {
                    name: "Kubernetes//Pod/default/foo".into(),
                    version: "1".into(),
                    resource: Some(pack_any(&address)),
                    ..Default::default()
                }],
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// Serves both services on a fresh loopback port and returns its address.
async fn start_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let incoming = TcpIncoming::from(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(EchoCa))
            .add_service(AggregatedDiscoveryServiceServer::new(EchoAds))
            .serve_with_incoming(incoming)
            .await
            .expect("test gRPC server runs until the test ends");
    });
    addr
}

/// gRPC length-prefixed framing: uncompressed flag, 4-byte big-endian length, message.
fn grpc_frame<M: Message>(message: &M) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(body.len()).expect("test message is small"));
    frame.put_slice(&body);
    frame.freeze()
}

/// Sends one gRPC message to `path` over raw HTTP/2 (no tonic on the client side) and returns
/// the first response message's bytes and the `grpc-status` trailer.
async fn raw_grpc_call(
    addr: SocketAddr,
    path: &str,
    frame: Bytes,
    end_stream: bool,
) -> (Bytes, String) {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to loopback server");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("valid request");
    let (response, mut send) = client.send_request(request, false).expect("send headers");
    send.send_data(frame, end_stream).expect("send body");
    let response = response.await.expect("response headers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut body = response.into_body();
    let mut received = BytesMut::new();
    while received.len() < 5
        || received.len()
            < 5 + usize::try_from(u32::from_be_bytes([
                received[1],
                received[2],
                received[3],
                received[4],
            ]))
            .expect("fits")
    {
        let chunk = body
            .data()
            .await
            .expect("server sends a message before ending the stream")
            .expect("body chunk");
        body.flow_control()
            .release_capacity(chunk.len())
            .expect("release flow control");
        received.extend_from_slice(&chunk);
    }
    let mut received = received.freeze();
    assert_eq!(received.get_u8(), 0, "response message is not compressed");
    let len = usize::try_from(received.get_u32()).expect("fits");
    let message = received.split_to(len);
    // Close our side so a streaming server ends too, then collect the trailers.
    if !end_stream {
        send.send_data(Bytes::new(), true).expect("half-close");
    }
    while let Some(chunk) = body.data().await {
        chunk.expect("body chunk");
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("grpc trailers present");
    let status = trailers["grpc-status"].to_str().expect("ascii").to_string();
    (message, status)
}

#[tokio::test]
async fn ca_answers_tonic_client_over_loopback() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let addr = start_server().await;
        let mut client = IstioCertificateServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect CA client");
        let response = client
            .create_certificate(IstioCertificateRequest {
                csr: "CSR".into(),
                validity_duration: 86400,
                metadata: Some(impersonation_metadata("spiffe://cluster.local/ns/a/sa/b")),
            })
            .await
            .expect("CreateCertificate succeeds")
            .into_inner();
        assert_eq!(
            response.cert_chain,
            vec!["leaf:CSR:spiffe://cluster.local/ns/a/sa/b:86400", "root"]
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn ca_method_path_matches_istio() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let addr = start_server().await;
        let request = IstioCertificateRequest {
            csr: "X".into(),
            ..Default::default()
        };
        let (message, status) =
            raw_grpc_call(addr, CA_METHOD_PATH, grpc_frame(&request), true).await;
        assert_eq!(status, "0");
        let response = IstioCertificateResponse::decode(message).expect("valid response");
        assert_eq!(response.cert_chain, vec!["leaf:X::0", "root"]);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn ads_delta_answers_tonic_client_over_loopback() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let addr = start_server().await;
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect ADS client");
        let first = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            ..Default::default()
        };
        let second = DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            resource_names_subscribe: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let mut responses = client
            .delta_aggregated_resources(futures::stream::iter([first, second]))
            .await
            .expect("stream opens")
            .into_inner();
        let response = responses
            .message()
            .await
            .expect("no error")
            .expect("one response");
        assert_eq!(response.type_url, ADDRESS_TYPE_URL);
        assert_eq!(response.nonce, "nonce-0");
        let any = response.resources[0]
            .resource
            .as_ref()
            .expect("resource body");
        let address = unpack_any::<Address>(any).expect("an Address");
        assert_eq!(
            address.resource_name().as_deref(),
            Some("Kubernetes//Pod/default/foo")
        );
        let response = responses
            .message()
            .await
            .expect("no error")
            .expect("two responses");
        assert_eq!(response.type_url, AUTHORIZATION_TYPE_URL);
        assert_eq!(response.nonce, "nonce-2");
        assert!(responses.message().await.expect("clean end").is_none());
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn ads_method_path_matches_envoy() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let addr = start_server().await;
        let request = DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            ..Default::default()
        };
        let (message, status) =
            raw_grpc_call(addr, ADS_METHOD_PATH, grpc_frame(&request), false).await;
        assert_eq!(status, "0");
        let response = DeltaDiscoveryResponse::decode(message).expect("valid response");
        assert_eq!(response.type_url, ADDRESS_TYPE_URL);
        assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/foo");
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn unknown_method_path_is_unimplemented() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let addr = start_server().await;
        // The state-of-the-world ADS method is deliberately not served.
        let (_, status) = raw_grpc_call_status_only(
            addr,
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        )
        .await;
        assert_eq!(status, "12", "grpc-status UNIMPLEMENTED");
    })
    .await
    .expect("test finished in time");
}

/// Like [`raw_grpc_call`] but for calls that fail without a response message: returns the
/// HTTP status and the `grpc-status` found in the headers or trailers.
async fn raw_grpc_call_status_only(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to loopback server");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("valid request");
    let (response, mut send) = client.send_request(request, false).expect("send headers");
    send.send_data(grpc_frame(&DeltaDiscoveryRequest::default()), true)
        .expect("send body");
    let response = response.await.expect("response headers");
    let code = response.status().as_u16();
    if let Some(status) = response.headers().get("grpc-status") {
        return (code, status.to_str().expect("ascii").to_string());
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("body chunk");
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("grpc trailers present");
    (
        code,
        trailers["grpc-status"].to_str().expect("ascii").to_string(),
    )
}
