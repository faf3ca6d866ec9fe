//! Inbound: HBONE (15008) terminates mutual TLS with the pod's own certificate, checks that the
//! tunnel targets this pod, applies L4 authorization with the caller's proven identity and
//! connects to the application from the caller's address; plaintext (15006) does the same for
//! redirected traffic from outside the mesh, with no identity (so STRICT PeerAuthentication,
//! delivered as a DENY policy, refuses it).

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_core::drain::DrainWatcher;
use ambit_hbone::server::{InboundRequest, Responder, serve_connection};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use super::metrics::{
    ConnectionRecord, Reporter, ResponseFlags, copy_counted, copy_counted_from_tunnel,
};
use super::outbound::{baggage, finish_copy};
use super::{PodContext, ProxyInputs, accept_loop};
use crate::rbac::ConnectionContext;
use crate::state::{Service, Workload};

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
            tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, dst.addr = %local, error = %e, "HBONE connection refused: no certificate for the pod");
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
) -> Result<SocketAddr, String> {
    if let Ok(target) = authority.parse::<SocketAddr>() {
        if target.ip() != local.ip() && !workload.addresses.contains(&target.ip()) {
            return Err(format!(
                "authority {authority} is not an address of this pod ({})",
                local.ip()
            ));
        }
        return Ok(SocketAddr::new(local.ip(), target.port()));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("authority {authority:?} is not host:port"))?;
    let service = workload
        .services
        .iter()
        .filter_map(|(key, _)| services(key))
        .find(|s| &*s.hostname == host)
        .ok_or_else(|| format!("this pod backs no service named {host}"))?;
    let target = workload
        .named_target_port(&service.key, port)
        .filter(|p| *p != 0)
        .or_else(|| {
            service
                .ports
                .iter()
                .find(|(s, t)| *s == port && *t != 0)
                .map(|(_, t)| *t)
        })
        .ok_or_else(|| format!("service {host} has no port {port} on this pod"))?;
    Ok(SocketAddr::new(local.ip(), target))
}

/// The service named by the client's `forwarded: ...;host=` when this pod backs it.
fn forwarded_service(
    headers: &HeaderMap,
    workload: &Workload,
    services: &dyn Fn(&str) -> Option<Arc<Service>>,
) -> Option<Arc<Service>> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    let host = value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("host="))?
        .trim_matches('"');
    workload
        .services
        .iter()
        .filter_map(|(key, _)| services(key))
        .find(|s| &*s.hostname == host)
}

async fn handle_connect(
    inputs: &ProxyInputs,
    pod: &PodContext,
    request: InboundRequest,
    responder: Responder,
    drain: DrainWatcher,
) {
    let mut record = ConnectionRecord::new(
        &inputs.metrics,
        Reporter::Destination,
        request.remote_addr,
        request.local_addr,
    );
    record.info.mtls = true;
    record.info.source_identity = Some(request.peer.identity().clone());
    record.info.destination_identity = Some(pod.spec.identity.clone());
    let Some(workload) = pod.workload(&inputs.mesh) else {
        responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
        record.finish(
            ResponseFlags::Connect,
            Some(&format!(
                "pod {}/{} is not (yet) known from xDS",
                pod.spec.namespace, pod.spec.name
            )),
        );
        return;
    };
    record.info.destination = Some(workload.clone());
    let target = {
        let index = inputs.mesh.index();
        record.info.source = index
            .workload_by_ip(&inputs.config.network, request.remote_addr.ip())
            .cloned();
        let services = |key: &str| index.service(key).cloned();
        record.info.service = forwarded_service(&request.headers, &workload, &services);
        resolve_target(&request.authority, request.local_addr, &workload, &services)
    };
    let target = match target {
        Ok(t) if inputs.config.is_reserved_port(t.port()) => {
            Err(format!("port {} is reserved for ztunnel", t.port()))
        }
        other => other,
    };
    let target = match target {
        Ok(target) => target,
        Err(reason) => {
            responder.refuse(StatusCode::BAD_REQUEST);
            record.finish(ResponseFlags::Connect, Some(&reason));
            return;
        }
    };
    record.upstream = Some(target);
    let context = ConnectionContext::verified(request.remote_addr.ip(), &request.peer, target);
    if let Err(reason) = authorize(inputs, &workload, &context) {
        responder.refuse(StatusCode::UNAUTHORIZED);
        record.finish(ResponseFlags::Deny, Some(&reason));
        return;
    }
    let app = match connect_app(inputs, pod, target, request.remote_addr).await {
        Ok(app) => app,
        Err(e) => {
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            record.finish(ResponseFlags::Connect, Some(&e));
            return;
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&baggage(&workload, &inputs.config.cluster_id)) {
        headers.insert("baggage", value);
    }
    let tunnel = match responder.accept(headers) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            record.finish(ResponseFlags::Connect, Some(&e.to_string()));
            return;
        }
    };
    record.opened();
    let result = copy_counted_from_tunnel(tunnel, app, &mut record, drain.forced()).await;
    finish_copy(record, result);
}

/// L4 authorization for the pod; logs dry-run verdicts. `Err` carries the reason.
fn authorize(
    inputs: &ProxyInputs,
    workload: &Workload,
    context: &ConnectionContext,
) -> Result<(), String> {
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
        Err(decision.reason)
    }
}

async fn connect_app(
    inputs: &ProxyInputs,
    pod: &PodContext,
    target: SocketAddr,
    client: SocketAddr,
) -> Result<TcpStream, String> {
    let source = inputs.config.preserve_source.then_some(client.ip());
    crate::socket::connect(&*pod.sockets, target, source, inputs.config.connect_timeout)
        .await
        .map_err(|e| format!("connect to the application at {target}: {e}"))
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
                match crate::socket::original_dst(&stream) {
                    Ok(dst) => proxy_plaintext(&inputs, &pod, stream, peer, dst, drain).await,
                    Err(e) => {
                        let mut record = ConnectionRecord::new(
                            &inputs.metrics,
                            Reporter::Destination,
                            peer,
                            stream.local_addr().unwrap_or(peer),
                        );
                        record.info.destination_identity = Some(pod.spec.identity.clone());
                        record.finish(
                            ResponseFlags::Connect,
                            Some(&format!("cannot read the original destination: {e}")),
                        );
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
    let mut record = ConnectionRecord::new(&inputs.metrics, Reporter::Destination, peer, dst);
    record.info.destination_identity = Some(pod.spec.identity.clone());
    record.info.source = inputs
        .mesh
        .index()
        .workload_by_ip(&inputs.config.network, peer.ip())
        .cloned();
    let Some(workload) = pod.workload(&inputs.mesh) else {
        record.finish(
            ResponseFlags::Connect,
            Some(&format!(
                "pod {}/{} is not (yet) known from xDS",
                pod.spec.namespace, pod.spec.name
            )),
        );
        return;
    };
    record.info.destination = Some(workload.clone());
    record.upstream = Some(dst);
    if inputs.config.is_reserved_port(dst.port()) {
        record.finish(
            ResponseFlags::Connect,
            Some(&format!("port {} is reserved for ztunnel", dst.port())),
        );
        return;
    }
    let context = ConnectionContext::plaintext(peer.ip(), dst);
    if let Err(reason) = authorize(inputs, &workload, &context) {
        record.finish(ResponseFlags::Deny, Some(&reason));
        return;
    }
    let app = match connect_app(inputs, pod, dst, peer).await {
        Ok(app) => app,
        Err(e) => {
            record.finish(ResponseFlags::Connect, Some(&e));
            return;
        }
    };
    record.opened();
    let result = copy_counted(downstream, app, &mut record, drain.forced()).await;
    finish_copy(record, result);
}
