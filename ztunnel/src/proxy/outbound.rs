//! Outbound (15001): a pod's redirected connection is routed by what its original destination
//! is: a service VIP (an endpoint is picked, or the service's waypoint), a mesh workload (HBONE
//! to its ztunnel, or its waypoint), a workload outside the mesh (plain TCP) or anything else
//! (passthrough). [`route`] is the decision alone, shared with tests and the explain command.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_core::drain::DrainWatcher;
use ambit_hbone::{ConnectRequest, HboneError, PoolKey};
use ambit_identity::Identity;
use ambit_state::{
    Address, GatewayAddress, GatewayDestination, LoadBalancingMode, Protocol, Service, StateIndex,
    Workload,
};
use http::{HeaderMap, HeaderValue};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use super::metrics::{
    ConnectionGuard, ConnectionInfo, Reporter, ResponseFlag, ResponseFlags, copy_counted,
    copy_counted_to_tunnel,
};
use super::{PodContext, ProxyInputs, accept_loop};

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub enum Route {
    /// HBONE to a ztunnel (or waypoint) at `next_hop`, asking for `authority`.
    Hbone {
        /// `<ip>:15008` of the destination pod or waypoint.
        next_hop: SocketAddr,
        /// The CONNECT `:authority`.
        authority: SocketAddr,
        /// Identities the server may prove.
        expected: Vec<Identity>,
        /// The pod (or waypoint) that terminates the tunnel.
        workload: Arc<Workload>,
        /// The service addressed, if any.
        service: Option<Arc<Service>>,
        /// True when the next hop is a waypoint.
        waypoint: bool,
    },
    /// Plain TCP to `dst`: a workload outside the mesh, or an address ztunnel does not know.
    Direct {
        /// Where to connect.
        dst: SocketAddr,
        /// The workload there, when known.
        workload: Option<Arc<Workload>>,
        /// The service addressed, if any.
        service: Option<Arc<Service>>,
    },
}

/// Why no route exists.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    /// The service has no healthy endpoint serving the port (or none matches its preferences).
    #[error(
        "service {service} has no healthy endpoint for port {port} (no ready pods, no pod backs \
         this port, or none satisfies the service's routing preferences)"
    )]
    NoEndpoint {
        /// `namespace/hostname`.
        service: String,
        /// The service port dialed.
        port: u16,
    },
    /// The service does not expose the port dialed.
    #[error("service {service} does not expose port {port}")]
    UnknownPort {
        /// `namespace/hostname`.
        service: String,
        /// The port dialed.
        port: u16,
    },
    /// The destination is bound to a waypoint ztunnel cannot find.
    #[error("{target} is bound to waypoint {waypoint}, which has no known healthy workload")]
    NoWaypoint {
        /// What was addressed.
        target: String,
        /// The waypoint as configured.
        waypoint: String,
    },
    /// The connection was addressed to ztunnel itself.
    #[error("connection to {0} loops back into ztunnel's own listener")]
    Loop(SocketAddr),
}

/// Decides where a connection from `source` to `dst` goes.
pub fn route(
    index: &StateIndex,
    network: &str,
    hbone_port: u16,
    source: Option<&Workload>,
    dst: SocketAddr,
) -> Result<Route, RouteError> {
    match index.find_address(network, dst.ip()) {
        Some(Address::Service(service)) => {
            route_service(index, network, hbone_port, source, service, dst)
        }
        Some(Address::Workload(workload)) => {
            if let Some(waypoint) = workload.waypoint.as_deref()
                && !is_waypoint_itself(index, network, source, waypoint)
            {
                return via_waypoint(index, network, source, waypoint, dst, None, &workload.uid);
            }
            Ok(to_workload(workload, dst.port(), hbone_port, dst, None))
        }
        None => Ok(Route::Direct {
            dst,
            workload: None,
            service: None,
        }),
    }
}

fn route_service(
    index: &StateIndex,
    network: &str,
    hbone_port: u16,
    source: Option<&Workload>,
    service: Arc<Service>,
    dst: SocketAddr,
) -> Result<Route, RouteError> {
    if let Some(waypoint) = service.waypoint.as_deref()
        && !is_waypoint_itself(index, network, source, waypoint)
    {
        return via_waypoint(
            index,
            network,
            source,
            waypoint,
            dst,
            Some(service.clone()),
            &service.key,
        );
    }
    if service
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.mode == LoadBalancingMode::Passthrough)
    {
        return Ok(Route::Direct {
            dst,
            workload: None,
            service: Some(service),
        });
    }
    if service.port(dst.port()).is_none() {
        return Err(RouteError::UnknownPort {
            service: service.key.to_string(),
            port: dst.port(),
        });
    }
    let (workload, target_port) = index
        .pick_endpoint(&service, dst.port(), source)
        .ok_or_else(|| RouteError::NoEndpoint {
            service: service.key.to_string(),
            port: dst.port(),
        })?;
    let authority_ip = workload.addresses.first().copied().unwrap_or(dst.ip());
    let authority = SocketAddr::new(authority_ip, target_port);
    let mut route = to_workload(
        workload,
        target_port,
        hbone_port,
        authority,
        Some(service.clone()),
    );
    if let Route::Hbone { expected, .. } = &mut route {
        expected.extend(
            service
                .subject_alt_names
                .iter()
                .filter_map(|s| s.parse().ok()),
        );
    }
    Ok(route)
}

fn to_workload(
    workload: Arc<Workload>,
    port: u16,
    hbone_port: u16,
    authority: SocketAddr,
    service: Option<Arc<Service>>,
) -> Route {
    let ip = workload
        .addresses
        .first()
        .copied()
        .unwrap_or(authority.ip());
    match workload.protocol {
        Protocol::Hbone => Route::Hbone {
            next_hop: SocketAddr::new(ip, hbone_port),
            authority,
            expected: vec![workload.identity()],
            workload,
            service,
            waypoint: false,
        },
        Protocol::Tcp => Route::Direct {
            dst: SocketAddr::new(ip, port),
            workload: Some(workload),
            service,
        },
    }
}

/// The waypoint's workload, resolved from its service or address.
fn waypoint_workload(
    index: &StateIndex,
    network: &str,
    source: Option<&Workload>,
    waypoint: &GatewayAddress,
) -> Option<Arc<Workload>> {
    match &waypoint.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => {
            let service = index.service(&format!("{namespace}/{hostname}"))?;
            index
                .pick_endpoint(service, waypoint.hbone_port, source)
                .map(|(w, _)| w)
                .or_else(|| index.any_endpoint(service))
        }
        GatewayDestination::Address { network: n, ip } => {
            let n = if n.is_empty() { network } else { n };
            index.workload_by_ip(n, *ip).cloned()
        }
    }
}

fn is_waypoint_itself(
    index: &StateIndex,
    network: &str,
    source: Option<&Workload>,
    waypoint: &GatewayAddress,
) -> bool {
    let Some(source) = source else { return false };
    match &waypoint.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => source
            .services
            .iter()
            .any(|(key, _)| **key == *format!("{namespace}/{hostname}")),
        GatewayDestination::Address { network: n, ip } => {
            let n = if n.is_empty() { network } else { n };
            *n == *source.network && source.addresses.contains(ip)
                || index
                    .workload_by_ip(n, *ip)
                    .is_some_and(|w| w.uid == source.uid)
        }
    }
}

fn via_waypoint(
    index: &StateIndex,
    network: &str,
    source: Option<&Workload>,
    waypoint: &GatewayAddress,
    dst: SocketAddr,
    service: Option<Arc<Service>>,
    target: &str,
) -> Result<Route, RouteError> {
    let workload = waypoint_workload(index, network, source, waypoint).ok_or_else(|| {
        RouteError::NoWaypoint {
            target: target.to_string(),
            waypoint: describe_waypoint(waypoint),
        }
    })?;
    let ip = workload
        .addresses
        .first()
        .copied()
        .ok_or_else(|| RouteError::NoWaypoint {
            target: target.to_string(),
            waypoint: describe_waypoint(waypoint),
        })?;
    Ok(Route::Hbone {
        next_hop: SocketAddr::new(ip, waypoint.hbone_port),
        authority: dst,
        expected: vec![workload.identity()],
        workload,
        service,
        waypoint: true,
    })
}

fn describe_waypoint(waypoint: &GatewayAddress) -> String {
    match &waypoint.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address { ip, .. } => ip.to_string(),
    }
}

/// Why an outbound connection failed, each failure with its response flag.
#[derive(Debug, Error)]
pub enum OutboundError {
    /// The connection was not redirected (no original destination).
    #[error("cannot read the original destination (connection not redirected?): {0}")]
    OriginalDst(#[source] std::io::Error),
    /// No route to the destination.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The HBONE tunnel could not be opened.
    #[error("HBONE to {next_hop}{via}: {chain}", via = via_text(*.waypoint), chain = ambit_xds::error_chain(.source))]
    Hbone {
        /// The ztunnel or waypoint dialled.
        next_hop: SocketAddr,
        /// True when it is a waypoint.
        waypoint: bool,
        /// What failed.
        source: HboneError,
    },
    /// The HBONE tunnel did not open in time.
    #[error("HBONE to {next_hop}: no answer within {after:?}")]
    HboneTimeout {
        /// The ztunnel or waypoint dialled.
        next_hop: SocketAddr,
        /// The connect timeout.
        after: std::time::Duration,
    },
    /// A plain TCP upstream did not accept the connection.
    #[error("connect to {target}: {source}")]
    Connect {
        /// Where it was dialled.
        target: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The copy between client and upstream failed or was cut at the drain deadline.
    #[error(transparent)]
    Copy(std::io::Error),
}

fn via_text(waypoint: bool) -> &'static str {
    if waypoint { " via waypoint" } else { "" }
}

impl ResponseFlag for OutboundError {
    fn response_flag(&self) -> ResponseFlags {
        use ambit_hbone::DialError;
        match self {
            OutboundError::Hbone {
                source:
                    HboneError::Dial {
                        source: DialError::Tls(_) | DialError::TlsConfig { .. },
                        ..
                    },
                ..
            } => ResponseFlags::TLS_FAILURE,
            OutboundError::Hbone {
                source:
                    HboneError::Dial {
                        source: DialError::Certificate { .. },
                        ..
                    },
                ..
            } => ResponseFlags::IDENTITY_ERROR,
            OutboundError::Hbone {
                source: HboneError::Status(status),
                ..
            } if status.as_u16() == 401 || status.as_u16() == 403 => ResponseFlags::DENY,
            _ => ResponseFlags::CONNECT,
        }
    }
}

/// Accepts redirected connections on the pod's outbound listener.
pub(crate) async fn serve(
    inputs: ProxyInputs,
    pod: Arc<PodContext>,
    listener: TcpListener,
    drain: DrainWatcher,
) {
    let local = listener.local_addr().ok();
    accept_loop(listener, drain, "outbound", move |stream, peer, drain| {
        let inputs = inputs.clone();
        let pod = pod.clone();
        async move {
            let dst = match crate::socket::original_dst(&stream) {
                Ok(dst) => dst,
                Err(e) => {
                    let info = ConnectionInfo {
                        source_identity: Some(pod.spec.identity.clone()),
                        ..ConnectionInfo::default()
                    };
                    info.open(
                        &inputs.metrics,
                        Reporter::Source,
                        peer,
                        local.unwrap_or(peer),
                    )
                    .fail(&OutboundError::OriginalDst(e));
                    return;
                }
            };
            proxy(&inputs, &pod, stream, peer, dst, drain).await;
        }
    })
    .await;
}

/// Proxies one outbound connection from the pod to its original destination `dst`.
pub async fn proxy(
    inputs: &ProxyInputs,
    pod: &PodContext,
    downstream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    drain: DrainWatcher,
) {
    let source = pod.workload(&inputs.mesh);
    let mut info = ConnectionInfo {
        source: source.clone(),
        source_identity: Some(pod.spec.identity.clone()),
        ..ConnectionInfo::default()
    };
    let local = downstream.local_addr().ok();
    let decision = if local == Some(dst) {
        Err(RouteError::Loop(dst))
    } else {
        route(
            &inputs.mesh.index(),
            &inputs.config.network,
            inputs.config.hbone_port,
            source.as_deref(),
            dst,
        )
    };
    match &decision {
        Ok(Route::Hbone {
            next_hop,
            expected,
            workload,
            service,
            ..
        }) => {
            info.upstream = Some(*next_hop);
            info.destination = Some(workload.clone());
            info.destination_identity = expected.first().cloned();
            info.service = service.clone();
            info.mtls = true;
        }
        Ok(Route::Direct {
            dst: target,
            workload,
            service,
        }) => {
            info.upstream = Some(*target);
            info.destination = workload.clone();
            info.service = service.clone();
        }
        Err(_) => {}
    }
    let mut conn = info.open(&inputs.metrics, Reporter::Source, peer, dst);
    let result = match decision {
        Ok(route) => {
            let source = source.as_deref();
            proxy_route(
                inputs, pod, downstream, peer, source, route, &mut conn, drain,
            )
            .await
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        conn.fail(&e);
    }
}

/// Connects along `route` and copies until either side closes.
#[allow(clippy::too_many_arguments)]
async fn proxy_route(
    inputs: &ProxyInputs,
    pod: &PodContext,
    downstream: TcpStream,
    peer: SocketAddr,
    source: Option<&Workload>,
    route: Route,
    conn: &mut ConnectionGuard,
    drain: DrainWatcher,
) -> Result<(), OutboundError> {
    match route {
        Route::Hbone {
            next_hop,
            authority,
            expected,
            service,
            waypoint,
            ..
        } => {
            let key = PoolKey {
                src_id: pod.spec.identity.clone(),
                dst_ids: expected,
                dst: next_hop,
                src: peer.ip(),
            };
            let request = ConnectRequest {
                authority: authority.to_string(),
                headers: request_headers(inputs, source, peer, service.as_deref()),
            };
            let connect = pod.pool.connect(key, request);
            let stream = tokio::time::timeout(inputs.config.connect_timeout, connect)
                .await
                .map_err(|_| OutboundError::HboneTimeout {
                    next_hop,
                    after: inputs.config.connect_timeout,
                })?
                .map_err(|source| OutboundError::Hbone {
                    next_hop,
                    waypoint,
                    source,
                })?;
            copy_counted_to_tunnel(downstream, stream, conn, drain.forced())
                .await
                .map_err(OutboundError::Copy)
        }
        Route::Direct { dst: target, .. } => {
            let upstream =
                crate::socket::connect(&*pod.sockets, target, None, inputs.config.connect_timeout)
                    .await
                    .map_err(|source| OutboundError::Connect { target, source })?;
            copy_counted(downstream, upstream, conn, drain.forced())
                .await
                .map_err(OutboundError::Copy)
        }
    }
}

/// `baggage`, `forwarded` and `traceparent` for the CONNECT request.
fn request_headers(
    inputs: &ProxyInputs,
    source: Option<&Workload>,
    peer: SocketAddr,
    service: Option<&Service>,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(source) = source
        && let Ok(value) = HeaderValue::from_str(&baggage(source, &inputs.config.cluster_id))
    {
        headers.insert("baggage", value);
    }
    let mut forwarded = format!("for=\"{peer}\"");
    if let Some(service) = service {
        forwarded.push_str(";host=");
        forwarded.push_str(&service.hostname);
    }
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert("forwarded", value);
    }
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    if let Ok(value) = HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-00")) {
        headers.insert("traceparent", value);
    }
    headers
}

/// The source workload's metadata in W3C baggage form, as upstream sends it.
pub fn baggage(workload: &Workload, cluster_id: &str) -> String {
    let cluster = if workload.cluster_id.is_empty() {
        cluster_id
    } else {
        &workload.cluster_id
    };
    let locality = workload.locality.as_deref();
    let pairs = [
        ("k8s.cluster.name", cluster),
        ("k8s.namespace.name", &*workload.namespace),
        ("k8s.deployment.name", &*workload.workload_name),
        ("service.name", &*workload.canonical_name),
        ("service.version", &*workload.canonical_revision),
        ("cloud.region", locality.map(|l| &*l.region).unwrap_or("")),
        (
            "cloud.availability_zone",
            locality.map(|l| &*l.zone).unwrap_or(""),
        ),
    ];
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
