//! HBONE on both sides of the waypoint.
//!
//! - In: the 15008 listener (TLS 1.3, client certificate required and of our trust domain,
//!   HTTP/2 with keepalive PINGs, at most 100 concurrent streams per connection as Istio's
//!   waypoint advertises); every CONNECT goes to [`Proxy::serve_tunnel`].
//! - Out: [`HboneDial`] opens a tunnel to `<podIP>:15008` with authority `<podIP>:<targetPort>`,
//!   presenting the waypoint's own certificate and checking the pod's identity, over pooled
//!   connections.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::drain::DrainWatcher;
use ambit_hbone::server::{InboundRequest, Responder, serve_connection};
use ambit_hbone::{ConnectRequest, H2Config, Pool, PoolKey};
use ambit_identity::Identity;
use ambit_identity::store::CertStore;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::Proxy;
use crate::upstream::{BoxedIo, Dial, Endpoint, UpstreamError};

/// Streams per downstream HTTP/2 connection (Istio's waypoint value; ztunnel caps its pool at
/// min(100, ours)).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens HBONE tunnels to backends with the waypoint's identity.
pub struct HboneDial {
    /// One per data-path worker ([`crate::worker::current`]); never empty.
    pools: Vec<Pool>,
    identity: Identity,
    source_ip: IpAddr,
    hbone_port: u16,
}

impl std::fmt::Debug for HboneDial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneDial")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl HboneDial {
    /// Tunnels through `pool`, presenting `identity` from `source_ip`.
    pub fn new(pool: Pool, identity: Identity, source_ip: IpAddr, hbone_port: u16) -> Self {
        Self {
            pools: vec![pool],
            identity,
            source_ip,
            hbone_port,
        }
    }

    /// Tunnels through the pool of the calling data-path worker: `pools[worker]`, or the first
    /// one (worker 0's) when there are fewer pools than workers; `None` when `pools` is empty.
    pub fn per_worker(
        pools: Vec<Pool>,
        identity: Identity,
        source_ip: IpAddr,
        hbone_port: u16,
    ) -> Option<Self> {
        if pools.is_empty() {
            return None;
        }
        Some(Self {
            pools,
            identity,
            source_ip,
            hbone_port,
        })
    }
}

impl Dial for HboneDial {
    fn dial(
        &self,
        endpoint: &Endpoint,
    ) -> Pin<Box<dyn Future<Output = Result<BoxedIo, UpstreamError>> + Send>> {
        let key = PoolKey {
            src_id: self.identity.clone(),
            dst_ids: endpoint
                .identities
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
            dst: SocketAddr::new(endpoint.addr.ip(), self.hbone_port),
            src: self.source_ip,
        };
        let pool = self
            .pools
            .get(crate::worker::current())
            .or(self.pools.first())
            .cloned();
        let addr = endpoint.addr;
        let request = connect_request(endpoint);
        Box::pin(async move {
            let pool = pool.ok_or_else(|| UpstreamError::Connect {
                endpoint: addr,
                reason: "no HBONE connection pool".to_string(),
            })?;
            let stream = pool
                .connect(key, request)
                .await
                .map_err(|e| UpstreamError::Connect {
                    endpoint: addr,
                    reason: e.to_string(),
                })?;
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

/// The CONNECT for `endpoint`: authority `podIP:targetPort`, and when the request was routed
/// through a Service, `forwarded: host=<hostname>` (as ztunnel's outbound sends it), which the
/// destination's ztunnel reports as `destination_service`. There is no `for=`: a tunnel carries
/// a pooled HTTP connection, so many clients' requests.
fn connect_request(endpoint: &Endpoint) -> ConnectRequest {
    let mut request = ConnectRequest::new(endpoint.addr.to_string());
    if let Some(value) = endpoint
        .service
        .as_ref()
        .and_then(|host| http::HeaderValue::from_str(&format!("host={host}")).ok())
    {
        request.headers.insert(http::header::FORWARDED, value);
    }
    request
}

/// Accepts HBONE connections on `listener` until `drain` fires, serving each with the
/// waypoint's current certificate.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    certs: CertStore,
    identity: Identity,
    drain: DrainWatcher,
) {
    let h2 = Arc::new(H2Config {
        server_max_concurrent_streams: MAX_CONCURRENT_STREAMS,
        // The 200 goes at once: the tunnel's HTTP server reads the tunnel while a request is in
        // flight (to see the client go), so holding the 200 would arm its timer on every new
        // tunnel, and a syscall count under a new connection per request showed no gain.
        answer_hold: Duration::ZERO,
        ..H2Config::default()
    });
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting an HBONE connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        let certs = certs.clone();
        let identity = identity.clone();
        let drain = drain.clone();
        let h2 = h2.clone();
        tokio::spawn(async move {
            serve_one(stream, peer, proxy, certs, identity, &h2, drain).await;
        });
    }
}

async fn serve_one(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    certs: CertStore,
    identity: Identity,
    h2: &H2Config,
    drain: DrainWatcher,
) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let config = match certs.get(&identity).await {
        Ok(cert) => match ambit_identity::tls::server_config(&cert) {
            Ok(config) => config,
            Err(error) => {
                tracing::warn!(%error, "cannot build the HBONE server TLS configuration");
                return;
            }
        },
        Err(error) => {
            tracing::warn!(src.addr = %peer, %error, "HBONE connection refused: the waypoint has no certificate yet");
            return;
        }
    };
    let handshake = ambit_identity::tls::accept(config, ambit_hbone::buffered(stream));
    let (tls, verified) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(error)) => {
            tracing::info!(src.addr = %peer, %error, "HBONE TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(src.addr = %peer, "HBONE TLS handshake timed out");
            return;
        }
    };
    let handler = move |request: InboundRequest, responder: Responder| {
        let proxy = proxy.clone();
        async move { proxy.serve_tunnel(request, responder).await }
    };
    let shutdown = async move {
        drain.signaled().await;
    };
    if let Err(error) = serve_connection(tls, verified, local, peer, h2, handler, shutdown).await {
        tracing::debug!(src.addr = %peer, %error, "HBONE connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(service: Option<&str>) -> Endpoint {
        Endpoint {
            addr: "10.0.0.7:8080".parse().unwrap(),
            identities: vec!["spiffe://cluster.local/ns/demo/sa/echo".to_string()],
            service: service.map(Arc::from),
        }
    }

    #[test]
    fn a_routed_request_names_its_service_in_forwarded_and_a_pod_addressed_one_names_none() {
        let routed = connect_request(&endpoint(Some("echo-v1.demo.svc.cluster.local")));
        assert_eq!(routed.authority, "10.0.0.7:8080");
        assert_eq!(
            routed.headers.get(http::header::FORWARDED).unwrap(),
            "host=echo-v1.demo.svc.cluster.local"
        );
        let direct = connect_request(&endpoint(None));
        assert_eq!(direct.authority, "10.0.0.7:8080");
        assert!(direct.headers.is_empty(), "{:?}", direct.headers);
    }
}
