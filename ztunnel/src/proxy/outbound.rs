//! Outbound (15001): a pod's redirected connection is routed by what its original destination
//! is: a service VIP (an endpoint is picked, or the service's waypoint), a mesh workload (HBONE
//! to its ztunnel, or its waypoint), a workload outside the mesh (plain TCP) or anything else
//! (passthrough). [`route`] is the decision alone (in `ambit-state`, shared with tests and the
//! explain command).

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_core::drain::DrainWatcher;
use ambit_hbone::{ConnectRequest, HboneError, PoolKey};
use ambit_state::{Service, Workload};
use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use super::metrics::{
    ConnectionGuard, ConnectionInfo, Reporter, ResponseFlag, ResponseFlags, copy_counted,
    copy_counted_to_tunnel,
};
use super::{PodContext, ProxyInputs, accept_loop};

pub use ambit_state::route::{Route, RouteError, route};

/// The most of the client's bytes sent with a CONNECT before the destination answers it: enough
/// for a request or a TLS ClientHello, bounded so a refused tunnel wastes little.
pub const EARLY_DATA_LIMIT: usize = 64 * 1024;

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
            let dst = match crate::socket::original_dst(&stream, peer) {
                Ok(dst) => dst,
                Err(e) => {
                    let info = ConnectionInfo {
                        source_identity: Some(pod.spec.identity.clone()),
                        ..ConnectionInfo::default()
                    };
                    info.open(
                        &pod.labels,
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
    let mut conn = info.open(&pod.labels, &inputs.metrics, Reporter::Source, peer, dst);
    conn.track(&inputs.connections, pod.owner());
    let result = match decision {
        Ok(route) => {
            let source = source.as_ref();
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
    source: Option<&Arc<Workload>>,
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
                headers: request_headers(inputs, pod, source, peer, service.as_deref()),
            };
            let mut downstream = downstream;
            // The client's first bytes go with the CONNECT instead of one round trip later.
            let connect =
                pod.pool
                    .connect_with_early_data(key, request, &mut downstream, EARLY_DATA_LIMIT);
            let (stream, early) = tokio::time::timeout(inputs.config.connect_timeout, connect)
                .await
                .map_err(|_| OutboundError::HboneTimeout {
                    next_hop,
                    after: inputs.config.connect_timeout,
                })?
                .map_err(|source| match source {
                    // The client broke its connection while the tunnel was opening.
                    HboneError::EarlyData { source, .. } => OutboundError::Copy(source),
                    source => OutboundError::Hbone {
                        next_hop,
                        waypoint,
                        source,
                    },
                })?;
            copy_counted_to_tunnel(downstream, stream, early, conn, drain.forced())
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

static BAGGAGE: HeaderName = HeaderName::from_static("baggage");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `baggage`, `forwarded` and `traceparent` for the CONNECT request.
fn request_headers(
    inputs: &ProxyInputs,
    pod: &PodContext,
    source: Option<&Arc<Workload>>,
    peer: SocketAddr,
    service: Option<&Service>,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    if let Some(value) =
        source.and_then(|source| pod.baggage.get(source, &inputs.config.cluster_id))
    {
        headers.insert(BAGGAGE.clone(), value);
    }
    let mut forwarded = String::with_capacity(64);
    // Writing into a String cannot fail.
    let _ = write!(forwarded, "for=\"{peer}\"");
    if let Some(service) = service {
        forwarded.push_str(";host=");
        forwarded.push_str(&service.hostname);
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
        headers.insert(FORWARDED.clone(), value);
    }
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    if let Ok(value) = HeaderValue::from_bytes(&traceparent(trace, span)) {
        headers.insert(TRACEPARENT.clone(), value);
    }
    headers
}

/// A W3C `traceparent` value (`00-<trace>-<span>-00`: version 0, not sampled).
fn traceparent(trace: u128, span: u64) -> [u8; 55] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, byte) in out[3..35].iter_mut().enumerate() {
        *byte = HEX[((trace >> (124 - 4 * i)) & 0xf) as usize];
    }
    for (i, byte) in out[36..52].iter_mut().enumerate() {
        *byte = HEX[((span >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A pod's `baggage` header value, built once per workload object (the state index replaces a
/// workload that changes, so a changed workload is a new object and gets a new value).
#[derive(Debug, Default)]
pub struct BaggageCache(std::sync::Mutex<Option<(Arc<Workload>, HeaderValue)>>);

impl BaggageCache {
    /// [`baggage`] of `workload` as a header value; `None` if it is not a valid one.
    pub fn get(&self, workload: &Arc<Workload>, cluster_id: &str) -> Option<HeaderValue> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_from, value)) = cached.as_ref()
            && Arc::ptr_eq(built_from, workload)
        {
            return Some(value.clone());
        }
        let value = HeaderValue::from_str(&baggage(workload, cluster_id)).ok()?;
        *cached = Some((workload.clone(), value.clone()));
        Some(value)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_is_built_once_per_workload_object() {
        let mut workload = Workload {
            uid: "uid-1".into(),
            name: "client-1".into(),
            namespace: "demo".into(),
            service_account: "client".into(),
            trust_domain: "cluster.local".into(),
            node: "node-1".into(),
            network: "".into(),
            cluster_id: "".into(),
            addresses: Box::new([]),
            protocol: ambit_state::Protocol::Hbone,
            waypoint: None,
            canonical_name: "client".into(),
            canonical_revision: "v1".into(),
            workload_name: "client".into(),
            services: Box::new([]),
            authorization_policies: Box::new([]),
            healthy: true,
            locality: None,
        };
        let first = Arc::new(workload.clone());
        let cache = BaggageCache::default();
        let value = cache.get(&first, "Kubernetes").unwrap();
        assert_eq!(
            value,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.deployment.name=client,\
             service.name=client,service.version=v1"
        );
        assert_eq!(cache.get(&first, "Kubernetes").unwrap(), value);
        // An update is a new object: its value, not the cached one.
        workload.canonical_revision = "v2".into();
        let updated = Arc::new(workload);
        let value = cache.get(&updated, "Kubernetes").unwrap();
        assert!(
            value.to_str().unwrap().ends_with("service.version=v2"),
            "{value:?}"
        );
    }

    #[test]
    fn traceparent_is_version_zero_hex_ids_not_sampled() {
        for (trace, span) in [
            (0u128, 0u64),
            (u128::MAX, u64::MAX),
            (
                0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
                0x00f0_0e0d_0c0b_0a09,
            ),
        ] {
            assert_eq!(
                std::str::from_utf8(&traceparent(trace, span)).unwrap(),
                format!("00-{trace:032x}-{span:016x}-00")
            );
        }
    }
}
