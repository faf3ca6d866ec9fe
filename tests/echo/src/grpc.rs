//! The gRPC side of `serve`, on the same port as HTTP (h2c): `grpc.health.v1.Health/Check`
//! answers SERVING, and `ambit.echo.v1.Echo/Echo` answers the message with the server's
//! identity and the request metadata that arrived.
//!
//! Controls, for tests of `grpc_response_status` metrics, retries and timeouts:
//! - metadata `x-echo-grpc-status: <code>` (0-16) answers that status, trailers-only;
//! - metadata `x-echo-delay-ms` (or the pod's `ECHO_DELAY_MS`) waits before answering;
//! - the pod's `ECHO_FAIL_FRACTION` (or metadata `x-echo-fail-fraction`) answers UNAVAILABLE
//!   to that fraction of calls.

use std::collections::HashMap;
use std::net::SocketAddr;

use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Code, Request, Response, Status};

use crate::Identity;
use crate::httpbin::{Controls, DELAY_HEADER, FAIL_FRACTION_HEADER, parse_delay, parse_fraction};

/// Request metadata asking for a given grpc-status.
pub(crate) const GRPC_STATUS_HEADER: &str = "x-echo-grpc-status";

/// Generated messages, servers and clients.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub(crate) mod pb {
    /// `ambit.echo.v1`.
    pub mod echo {
        tonic::include_proto!("ambit.echo.v1");
    }
    /// `grpc.health.v1`.
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}

use pb::echo::echo_server::{Echo, EchoServer};
use pb::echo::{EchoRequest, EchoResponse};
use pb::health::health_check_response::ServingStatus;
use pb::health::health_server::{Health, HealthServer};
use pb::health::{HealthCheckRequest, HealthCheckResponse};

/// The TCP peer of the connection a request came on (put in the request's extensions).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// True for a request gRPC must answer: `content-type: application/grpc` or `application/grpc+*`.
pub(crate) fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Both services as one tower service (hand it gRPC requests).
pub(crate) fn routes(id: Identity, controls: Controls) -> tonic::service::Routes {
    let service = EchoService { id, controls };
    tonic::service::Routes::new(HealthServer::new(service.clone()))
        .add_service(EchoServer::new(service))
}

#[derive(Clone)]
struct EchoService {
    id: Identity,
    controls: Controls,
}

fn metadata_str<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

impl EchoService {
    /// Applies the controls every call shares: delay, then the random failure.
    async fn controls(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let mut delay = self.controls.delay;
        let mut fail_fraction = self.controls.fail_fraction;
        if let Some(v) = metadata_str(metadata, DELAY_HEADER) {
            delay = parse_delay(&format!("metadata {DELAY_HEADER}"), v)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if let Some(v) = metadata_str(metadata, FAIL_FRACTION_HEADER) {
            fail_fraction = parse_fraction(&format!("metadata {FAIL_FRACTION_HEADER}"), v)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if rand::random::<f64>() < fail_fraction {
            return Err(Status::unavailable(format!(
                "ambit-echo {}: failing {fail_fraction} of calls as asked",
                self.id.pod
            )));
        }
        Ok(())
    }
}

/// The status asked for with `x-echo-grpc-status`, if any (OK means answer normally).
fn asked_status(metadata: &MetadataMap) -> Result<Option<Status>, Status> {
    let Some(value) = metadata.get(GRPC_STATUS_HEADER) else {
        return Ok(None);
    };
    let code = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|c| (0..=16).contains(c))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "metadata {GRPC_STATUS_HEADER}: {value:?} is not a gRPC status code (0-16)"
            ))
        })?;
    let code = Code::from_i32(code);
    if code == Code::Ok {
        return Ok(None);
    }
    Ok(Some(Status::new(
        code,
        format!("ambit-echo: answering {code:?} as {GRPC_STATUS_HEADER} asked"),
    )))
}

#[tonic::async_trait]
impl Health for EchoService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        let status = if service.is_empty()
            || service == "ambit.echo.v1.Echo"
            || service == "grpc.health.v1.Health"
        {
            ServingStatus::Serving
        } else {
            ServingStatus::ServiceUnknown
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        self.controls(request.metadata()).await?;
        if let Some(status) = asked_status(request.metadata())? {
            return Err(status);
        }
        let peer = request
            .extensions()
            .get::<Peer>()
            .map(|p| p.0.to_string())
            .unwrap_or_default();
        let metadata: HashMap<String, String> = request
            .metadata()
            .iter()
            .filter_map(|entry| match entry {
                KeyAndValueRef::Ascii(k, v) => v
                    .to_str()
                    .ok()
                    .map(|v| (k.as_str().to_string(), v.to_string())),
                KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        Ok(Response::new(EchoResponse {
            message: request.into_inner().message,
            pod: self.id.pod.clone(),
            namespace: self.id.namespace.clone(),
            version: self.id.version.clone(),
            node: self.id.node.clone(),
            peer,
            metadata,
        }))
    }
}
