//! Inbound: HBONE (15008) terminates mutual TLS with the pod's own certificate, checks that the
//! tunnel targets this pod, applies L4 authorization with the caller's proven identity and
//! connects to the application from the caller's address; plaintext (15006) does the same for
//! redirected traffic from outside the mesh, with no identity (so STRICT PeerAuthentication,
//! delivered as a DENY policy, refuses it).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_authz::ConnectionContext;
use ambit_core::drain::DrainWatcher;
use ambit_hbone::HboneError;
use ambit_hbone::server::{InboundRequest, Responder, serve_connection};
use ambit_state::{Service, Workload};
use http::{HeaderMap, StatusCode};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use super::metrics::{
    ConnectionGuard, ConnectionInfo, Reporter, ResponseFlag, ResponseFlags, copy_counted,
    copy_counted_from_tunnel,
};
use super::{PodContext, ProxyInputs, accept_loop};

/// Why an inbound connection was refused or ended badly. Each failure carries its response flag
/// (metrics, access log) and, for HBONE, the status the CONNECT is refused with.
#[derive(Debug, Error)]
pub enum InboundError {
    /// The pod is served by ztunnel but absent from the configuration.
    #[error("pod {0} is not (yet) known from xDS")]
    UnknownPod(String),
    /// The CONNECT names an IP that is not this pod's.
    #[error("authority {authority} is not an address of this pod ({pod_ip})")]
    NotThisPod {
        /// The `:authority` received.
        authority: String,
        /// The pod's address.
        pod_ip: IpAddr,
    },
    /// The CONNECT's authority is neither `ip:port` nor `host:port`.
    #[error("authority {0:?} is not host:port")]
    BadAuthority(String),
    /// The CONNECT names a service this pod does not back.
    #[error("this pod backs no service named {0}")]
    UnknownService(String),
    /// The service has no such port on this pod.
    #[error("service {host} has no port {port} on this pod")]
    UnknownPort {
        /// The service hostname.
        host: String,
        /// The port asked for.
        port: u16,
    },
    /// The target is one of ztunnel's own ports (a loop).
    #[error("port {0} is reserved for ztunnel")]
    ReservedPort(u16),
    /// L4 authorization refused the connection; the text is the decision's reason.
    #[error("{0}")]
    Denied(String),
    /// The application did not accept the connection.
    #[error("connect to the application at {target}: {source}")]
    ConnectApp {
        /// Where the application was dialled.
        target: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// The redirected connection's original destination could not be read.
    #[error("cannot read the original destination: {0}")]
    OriginalDst(#[source] io::Error),
    /// Answering the CONNECT failed (the client went away).
    #[error(transparent)]
    Accept(HboneError),
    /// The copy between client and application failed or was cut at the drain deadline.
    #[error(transparent)]
    Copy(io::Error),
}

impl InboundError {
    /// The status a refused CONNECT is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            InboundError::NotThisPod { .. }
            | InboundError::BadAuthority(_)
            | InboundError::UnknownService(_)
            | InboundError::UnknownPort { .. }
            | InboundError::ReservedPort(_) => StatusCode::BAD_REQUEST,
            InboundError::Denied(_) => StatusCode::UNAUTHORIZED,
            InboundError::UnknownPod(_)
            | InboundError::ConnectApp { .. }
            | InboundError::OriginalDst(_)
            | InboundError::Accept(_)
            | InboundError::Copy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl ResponseFlag for InboundError {
    fn response_flag(&self) -> ResponseFlags {
        match self {
            InboundError::Denied(_) => ResponseFlags::DENY,
            _ => ResponseFlags::CONNECT,
        }
    }
}

/// Accepts HBONE connections on the pod's 15008 listener.
pub(crate) async fn serve_hbone(
    inputs: ProxyInputs,
    pod: Arc<PodContext>,
    listener: TcpListener,
    drain: DrainWatcher,
) {
    accept_loop(
        listener,
        drain,
        "inbound-hbone",
        move |stream, peer, drain| {
            let inputs = inputs.clone();
            let pod = pod.clone();
            async move { serve_hbone_connection(inputs, pod, stream, peer, drain).await }
        },
    )
    .await;
}

async fn serve_hbone_connection(
    inputs: ProxyInputs,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: DrainWatcher,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let config = match pod.server_tls(&inputs.certs).await {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, error = %e, "HBONE connection refused: the pod cannot present a certificate");
            return;
        }
    };
    let handshake = ambit_identity::tls::accept(config, ambit_hbone::buffered(stream));
    let (tls, verified) = match tokio::time::timeout(inputs.config.handshake_timeout, handshake)
        .await
    {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, error = %e, "HBONE TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, "HBONE TLS handshake timed out");
            return;
        }
    };
    let mut tls = tls;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(ambit_hbone::TLS_WRITE_BUFFER));
    let handler_drain = drain.clone();
    let h2 = inputs.config.pool.h2.clone();
    let handler = move |request: InboundRequest, responder: Responder| {
        let inputs = inputs.clone();
        let pod = pod.clone();
        let drain = handler_drain.clone();
        async move { handle_connect(&inputs, &pod, request, responder, drain).await }
    };
    let shutdown = async move {
        drain.signaled().await;
    };
    if let Err(e) = serve_connection(tls, verified, local, peer, &h2, handler, shutdown).await {
        tracing::debug!(src.addr = %peer, error = %e, "HBONE connection ended with an error");
    }
}

/// Where a CONNECT's `:authority` points on this pod.
fn resolve_target(
    authority: &str,
    local: SocketAddr,
    workload: &Workload,
    services: &dyn Fn(&str) -> Option<Arc<Service>>,
) -> Result<SocketAddr, InboundError> {
    if let Ok(target) = authority.parse::<SocketAddr>() {
        if target.ip() != local.ip() && !workload.addresses.contains(&target.ip()) {
            return Err(InboundError::NotThisPod {
                authority: authority.to_string(),
                pod_ip: local.ip(),
            });
        }
        return Ok(SocketAddr::new(local.ip(), target.port()));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| InboundError::BadAuthority(authority.to_string()))?;
    let service = workload
        .services
        .iter()
        .filter_map(|(key, _)| services(key))
        .find(|s| &*s.hostname == host)
        .ok_or_else(|| InboundError::UnknownService(host.to_string()))?;
    let target = workload
        .named_target_port(&service.key, port)
        .filter(|p| *p != 0)
        .or_else(|| {
            service
                .ports
                .iter()
                .find(|p| p.service_port == port && p.target_port != 0)
                .map(|p| p.target_port)
        })
        .ok_or_else(|| InboundError::UnknownPort {
            host: host.to_string(),
            port,
        })?;
    Ok(SocketAddr::new(local.ip(), target))
}

/// The service a connection to `target` on this pod is reported under (`destination_service`),
/// as upstream ztunnel picks it: the one the client named in `forwarded: ...;host=` or in the
/// CONNECT's authority when this pod backs it, else the first service this pod backs with a port
/// whose target port is `target`'s (a pod-addressed call, or a client that names none).
fn inbound_service(
    headers: &HeaderMap,
    authority: &str,
    target: Option<u16>,
    workload: &Workload,
    services: &dyn Fn(&str) -> Option<Arc<Service>>,
) -> Option<Arc<Service>> {
    let forwarded = headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(|value| {
            value
                .split(';')
                .find_map(|part| part.trim().strip_prefix("host="))
        })
        .map(|host| host.trim_matches('"'));
    let authority = authority
        .rsplit_once(':')
        .map(|(host, _)| host)
        .filter(|host| host.parse::<std::net::IpAddr>().is_err());
    let backed = || {
        workload
            .services
            .iter()
            .filter_map(|(key, ports)| Some((services(key)?, ports)))
    };
    let named = |host: Option<&str>| {
        let host = host?;
        backed()
            .map(|(service, _)| service)
            .find(|s| &*s.hostname == host)
    };
    named(forwarded).or_else(|| named(authority)).or_else(|| {
        let target = target?;
        backed()
            .find(|(service, ports)| {
                ports.iter().any(|(_, t)| *t == target)
                    || service.ports.iter().any(|p| p.target_port == target)
            })
            .map(|(service, _)| service)
    })
}

fn unknown_pod(pod: &PodContext) -> InboundError {
    InboundError::UnknownPod(format!("{}/{}", pod.spec.namespace, pod.spec.name))
}

async fn handle_connect(
    inputs: &ProxyInputs,
    pod: &PodContext,
    request: InboundRequest,
    responder: Responder,
    drain: DrainWatcher,
) {
    let mut info = ConnectionInfo {
        mtls: true,
        source_identity: Some(request.peer.identity().clone()),
        destination_identity: Some(pod.spec.identity.clone()),
        ..ConnectionInfo::default()
    };
    let checked = check_connect(inputs, pod, &request, &mut info);
    let mut conn = info.open(
        &pod.labels,
        &inputs.metrics,
        Reporter::Destination,
        request.remote_addr,
        request.local_addr,
    );
    conn.track(&inputs.connections, pod.owner());
    if let Err(e) = serve_connect(inputs, pod, &request, responder, checked, &mut conn, drain).await
    {
        conn.fail(&e);
    }
}

/// Everything decided before dialling the application: the pod is known, the target is one of
/// its ports, and policy admits the caller. Fills in what metrics need as it learns it.
fn check_connect(
    inputs: &ProxyInputs,
    pod: &PodContext,
    request: &InboundRequest,
    info: &mut ConnectionInfo,
) -> Result<(SocketAddr, Arc<Workload>), InboundError> {
    let workload = pod.workload(&inputs.mesh).ok_or_else(|| unknown_pod(pod))?;
    info.destination = Some(workload.clone());
    let target = {
        let index = inputs.mesh.index();
        info.source = index
            .workload_by_ip(&inputs.config.network, request.remote_addr.ip())
            .cloned();
        let services = |key: &str| index.service(key).cloned();
        let target = resolve_target(&request.authority, request.local_addr, &workload, &services);
        info.service = inbound_service(
            &request.headers,
            &request.authority,
            target.as_ref().ok().map(SocketAddr::port),
            &workload,
            &services,
        );
        target?
    };
    if inputs.config.is_reserved_port(target.port()) {
        return Err(InboundError::ReservedPort(target.port()));
    }
    info.upstream = Some(target);
    let context = ConnectionContext::verified(request.remote_addr.ip(), &request.peer, target);
    authorize(inputs, &workload, &context)?;
    Ok((target, workload))
}

async fn serve_connect(
    inputs: &ProxyInputs,
    pod: &PodContext,
    request: &InboundRequest,
    responder: Responder,
    checked: Result<(SocketAddr, Arc<Workload>), InboundError>,
    conn: &mut ConnectionGuard,
    drain: DrainWatcher,
) -> Result<(), InboundError> {
    let dialled = match checked {
        Ok((target, workload)) => connect_app(inputs, pod, target, request.remote_addr)
            .await
            .map(|app| (app, workload)),
        Err(e) => Err(e),
    };
    let (app, workload) = match dialled {
        Ok(dialled) => dialled,
        Err(e) => {
            responder.refuse(e.status());
            return Err(e);
        }
    };
    let mut headers = HeaderMap::with_capacity(1);
    if let Some(value) = pod.baggage.get(&workload, &inputs.config.cluster_id) {
        headers.insert(http::header::HeaderName::from_static("baggage"), value);
    }
    let tunnel = responder.accept(headers).map_err(InboundError::Accept)?;
    copy_counted_from_tunnel(tunnel, app, conn, drain.forced())
        .await
        .map_err(InboundError::Copy)
}

/// L4 authorization for the pod; logs dry-run verdicts.
fn authorize(
    inputs: &ProxyInputs,
    workload: &Workload,
    context: &ConnectionContext,
) -> Result<(), InboundError> {
    let selected: Vec<String> = workload
        .authorization_policies
        .iter()
        .map(|p| p.to_string())
        .collect();
    let decision = inputs
        .mesh
        .policies()
        .authorize(&workload.namespace, &selected, context);
    for m in &decision.dry_run {
        tracing::info!(target: "access", policy = %m.policy, action = %m.action, rule = m.rule, src.ip = %context.src_ip(), dst.addr = %context.dst(), "dry-run policy matched (not enforced)");
    }
    if decision.allowed {
        Ok(())
    } else {
        Err(InboundError::Denied(decision.reason))
    }
}

async fn connect_app(
    inputs: &ProxyInputs,
    pod: &PodContext,
    target: SocketAddr,
    client: SocketAddr,
) -> Result<TcpStream, InboundError> {
    let source = inputs.config.preserve_source.then_some(client.ip());
    crate::socket::connect(&*pod.sockets, target, source, inputs.config.connect_timeout)
        .await
        .map_err(|source| InboundError::ConnectApp { target, source })
}

/// Accepts redirected plaintext connections on the pod's 15006 listener.
pub(crate) async fn serve_plaintext(
    inputs: ProxyInputs,
    pod: Arc<PodContext>,
    listener: TcpListener,
    drain: DrainWatcher,
) {
    accept_loop(
        listener,
        drain,
        "inbound-plaintext",
        move |stream, peer, drain| {
            let inputs = inputs.clone();
            let pod = pod.clone();
            async move {
                match crate::socket::original_dst(&stream, peer) {
                    Ok(dst) => proxy_plaintext(&inputs, &pod, stream, peer, dst, drain).await,
                    Err(e) => {
                        let info = ConnectionInfo {
                            destination_identity: Some(pod.spec.identity.clone()),
                            ..ConnectionInfo::default()
                        };
                        let local = stream.local_addr().unwrap_or(peer);
                        info.open(
                            &pod.labels,
                            &inputs.metrics,
                            Reporter::Destination,
                            peer,
                            local,
                        )
                        .fail(&InboundError::OriginalDst(e));
                    }
                }
            }
        },
    )
    .await;
}

/// Proxies one plaintext connection from `peer` to this pod's `dst`.
pub async fn proxy_plaintext(
    inputs: &ProxyInputs,
    pod: &PodContext,
    downstream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    drain: DrainWatcher,
) {
    let mut info = ConnectionInfo {
        destination_identity: Some(pod.spec.identity.clone()),
        source: inputs
            .mesh
            .index()
            .workload_by_ip(&inputs.config.network, peer.ip())
            .cloned(),
        ..ConnectionInfo::default()
    };
    let checked = check_plaintext(inputs, pod, peer, dst, &mut info);
    let mut conn = info.open(
        &pod.labels,
        &inputs.metrics,
        Reporter::Destination,
        peer,
        dst,
    );
    conn.track(&inputs.connections, pod.owner());
    let result = match checked {
        Ok(()) => copy_plaintext(inputs, pod, downstream, peer, dst, &mut conn, drain).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        conn.fail(&e);
    }
}

fn check_plaintext(
    inputs: &ProxyInputs,
    pod: &PodContext,
    peer: SocketAddr,
    dst: SocketAddr,
    info: &mut ConnectionInfo,
) -> Result<(), InboundError> {
    let workload = pod.workload(&inputs.mesh).ok_or_else(|| unknown_pod(pod))?;
    info.destination = Some(workload.clone());
    info.upstream = Some(dst);
    if inputs.config.is_reserved_port(dst.port()) {
        return Err(InboundError::ReservedPort(dst.port()));
    }
    authorize(
        inputs,
        &workload,
        &ConnectionContext::plaintext(peer.ip(), dst),
    )
}

async fn copy_plaintext(
    inputs: &ProxyInputs,
    pod: &PodContext,
    downstream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    conn: &mut ConnectionGuard,
    drain: DrainWatcher,
) -> Result<(), InboundError> {
    let app = connect_app(inputs, pod, dst, peer).await?;
    copy_counted(downstream, app, conn, drain.forced())
        .await
        .map_err(InboundError::Copy)
}
