//! The outbound routing decision both ztunnel's data path and `ambitctl explain` make: where a
//! connection from a pod to an original destination goes (a service VIP: an endpoint or the
//! service's waypoint; a mesh workload: HBONE to its ztunnel or its waypoint; a workload outside
//! the mesh: plain TCP; anything else: passthrough). Pure over the [`StateIndex`].

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_identity::Identity;
use thiserror::Error;

use crate::{
    Address, GatewayAddress, GatewayDestination, LoadBalancingMode, Protocol, Service, StateIndex,
    Workload,
};

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

/// True when `source` is the waypoint `waypoint` names (its traffic must not loop back to it).
pub fn is_waypoint_itself(
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

/// `namespace/hostname` or the IP of a waypoint, for messages.
pub fn describe_waypoint(waypoint: &GatewayAddress) -> String {
    match &waypoint.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address { ip, .. } => ip.to_string(),
    }
}
