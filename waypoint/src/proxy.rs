//! The data path: one HBONE CONNECT stream at a time.
//!
//! 1. The `:authority` says what the client dialed. A Service VIP selects that Service's port,
//!    its protocol and its routes; a pod IP is forwarded to that pod under policy only (never by
//!    route). The Host header never selects the Service.
//! 2. The tunnel is accepted (200) before any backend is dialled, as Istio's waypoint does; a
//!    backend failure then shows as an HTTP status (or a reset for TCP) inside the tunnel.
//! 3. HTTP ports are served with hyper (HTTP/1.1 with keep-alive and Upgrade, or HTTP/2):
//!    authorization, route choice, filters, backend and endpoint choice, then the request goes
//!    over HBONE to the chosen pod with the waypoint's own identity. TCP ports are authorized at
//!    L4 and spliced to an endpoint.
//!
//! Every way a request can fail is an [`RequestError`] carrying its status and response flag,
//! mapped to a response in one place ([`RequestError::response`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ambit_authz::{ConnectionContext, PolicyStore, Target};
use ambit_hbone::server::{InboundRequest, Responder};
use ambit_identity::tls::VerifiedPeer;
use ambit_state::{Address, Addresses, Service, Workload};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::filters::{self, Applied};
use crate::routes::{Decision, RequestView, RouteTable};
use crate::sniff::{self, Detected, Prefixed};
use crate::telemetry::Telemetry;
use crate::upstream::{
    BoxError, ConnLimits, Dial, Endpoint, Protocol, RequestBody, UpstreamError, Upstreams,
};
use ambit_telemetry::{
    ConnectionGuard, LiveConnections, RequestGuard, ResponseFlag, ResponseFlags,
};
use std::sync::atomic::AtomicU64;

/// The response body type.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// Settings of the data path.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `namespace/name` of the Gateway this waypoint is.
    pub gateway: String,
    /// Its GatewayClass.
    pub gateway_class: String,
    /// The network the waypoint is on (empty: default).
    pub network: String,
    /// How long an undeclared port waits for the client's first bytes.
    pub sniff_timeout: Duration,
    /// The waypoint pod's IP: its own workload (found by it) gives the locality DestinationRule
    /// locality load balancing prefers.
    pub instance_ip: Option<IpAddr>,
}

/// The routes and policies the control plane sent, replaced as a whole on every change.
#[derive(Debug, Default)]
pub struct L7Config {
    /// Routes by Service.
    pub routes: RouteTable,
    /// Waypoint authorization policies.
    pub policies: PolicyStore,
    /// The route resources compiled into `routes`, by name.
    pub route_names: Vec<String>,
    /// DestinationRules by Service.
    pub destinations: crate::traffic::Destinations,
}

/// What every connection shares.
pub struct Proxy {
    settings: ProxySettings,
    state: Addresses,
    l7: RwLock<Arc<L7Config>>,
    upstreams: Upstreams,
    dial: Arc<dyn Dial>,
    telemetry: Telemetry,
    traffic: crate::traffic::TrafficState,
    tracer: crate::tracing::Tracer,
    /// The TCP connections proxied at L4 right now (HTTP is accounted per request).
    connections: LiveConnections,
    /// The Gateway's `namespace/name`, as the owner of those connections.
    owner: Arc<str>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What the client dialed, resolved.
#[derive(Debug, Clone)]
enum Dest {
    /// A Service VIP and port.
    Service {
        service: Arc<Service>,
        port: u16,
        protocol: PortProtocol,
    },
    /// A pod IP and port.
    Workload { workload: Arc<Workload>, port: u16 },
}

/// A Service port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// Undeclared: sniff.
    Unknown,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 or gRPC.
    Http2,
    /// TCP or TLS: never sniffed.
    Tcp,
}

/// One accepted tunnel.
#[derive(Debug)]
struct Conn {
    peer: VerifiedPeer,
    src: SocketAddr,
    dst: SocketAddr,
    target: Dest,
    source: Option<Arc<Workload>>,
    policy_targets: Vec<Target>,
}

/// Why a request was not forwarded or not answered by a backend.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Authorization refused it.
    #[error("RBAC: access denied")]
    Denied {
        /// The policy that decided, if one did.
        policy: Option<String>,
    },
    /// Routes attach to the Service but none matched.
    #[error("no route matched {method} {path} for {service}")]
    NoRoute {
        /// The Service.
        service: String,
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The matched rule's chosen backend is invalid (or every weight is 0).
    #[error("{0}")]
    InvalidBackend(String),
    /// No healthy endpoint.
    #[error("no healthy upstream for {service} port {port}")]
    NoHealthyUpstream {
        /// The Service.
        service: String,
        /// The port.
        port: u16,
    },
    /// The backend could not be reached.
    #[error("upstream connect error: {0}")]
    Connect(UpstreamError),
    /// The backend reset the request.
    #[error("upstream reset: {0}")]
    Reset(UpstreamError),
    /// A timeout passed.
    #[error("upstream request timeout ({0:?})")]
    Timeout(Duration),
    /// The destination's connection-pool limit is reached.
    #[error("upstream overflow: the connection pool of {0} is full")]
    Overflow(String),
}

impl RequestError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Denied { .. } => StatusCode::FORBIDDEN,
            RequestError::NoRoute { .. } => StatusCode::NOT_FOUND,
            RequestError::InvalidBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RequestError::NoHealthyUpstream { .. } | RequestError::Connect(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RequestError::Reset(_) => StatusCode::BAD_GATEWAY,
            RequestError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The answer the client gets: the status, the reason in the body and in
    /// `x-ambit-error`, and the response flag in `x-ambit-response-flags`.
    pub fn response(&self) -> Response<ResponseBody> {
        let status = self.status();
        let flags = self.response_flag().as_label();
        let text = self.to_string();
        let mut response = Response::new(full(Bytes::from(format!("{text}\n"))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Ok(value) = HeaderValue::from_str(&flags) {
            headers.insert("x-ambit-response-flags", value);
        }
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert("x-ambit-error", value);
        }
        response
    }
}

impl ResponseFlag for RequestError {
    fn response_flag(&self) -> ResponseFlags {
        match self {
            // Envoy sets no flag for an RBAC denial; the 403 says it.
            RequestError::Denied { .. } => ResponseFlags::NONE,
            RequestError::NoRoute { .. } | RequestError::InvalidBackend(_) => {
                ResponseFlags::NO_ROUTE
            }
            RequestError::NoHealthyUpstream { .. } => ResponseFlags::NO_HEALTHY_UPSTREAM,
            RequestError::Connect(_) => ResponseFlags::UPSTREAM_CONNECT_FAILURE,
            RequestError::Reset(_) => ResponseFlags::UPSTREAM_RESET,
            RequestError::Timeout(_) => ResponseFlags::UPSTREAM_TIMEOUT,
            RequestError::Overflow(_) => ResponseFlags::UPSTREAM_OVERFLOW,
        }
    }
}

fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// What policies a tunnel is authorized against: those targeting the waypoint's Gateway
/// (`namespace/name`), its class, and, for a service-addressed tunnel, the Service
/// (`namespace/hostname`). `ambitctl explain` calls this too.
pub fn policy_targets(
    gateway: &str,
    gateway_class: Option<&str>,
    service: Option<&str>,
) -> Vec<Target> {
    let mut targets = vec![Target::Gateway(gateway.to_string())];
    targets.extend(gateway_class.map(|c| Target::GatewayClass(c.to_string())));
    targets.extend(service.map(|s| Target::Service(s.to_string())));
    targets
}

/// The protocol a Service port declares.
pub fn port_protocol(service: &Service, port: u16) -> Option<PortProtocol> {
    use ambit_state::AppProtocol as P;
    service.port(port).map(|p| match p.app_protocol {
        P::Http11 => PortProtocol::Http1,
        P::Http2 | P::Grpc => PortProtocol::Http2,
        P::Tcp | P::Tls => PortProtocol::Tcp,
        P::Unknown => PortProtocol::Unknown,
    })
}

impl Proxy {
    /// The data path over `state`, dialing backends through `dial`, without tracing.
    pub fn new(
        settings: ProxySettings,
        state: Addresses,
        dial: Arc<dyn Dial>,
        telemetry: Telemetry,
    ) -> Arc<Self> {
        Self::with_tracer(
            settings,
            state,
            dial,
            telemetry,
            crate::tracing::Tracer::disabled(),
        )
    }

    /// The data path, making a trace span per request (and per upstream try) with `tracer`.
    pub fn with_tracer(
        settings: ProxySettings,
        state: Addresses,
        dial: Arc<dyn Dial>,
        telemetry: Telemetry,
        tracer: crate::tracing::Tracer,
    ) -> Arc<Self> {
        let owner = Arc::from(settings.gateway.as_str());
        Arc::new(Self {
            settings,
            state,
            l7: RwLock::new(Arc::new(L7Config::default())),
            upstreams: Upstreams::new(dial.clone()),
            dial,
            traffic: crate::traffic::TrafficState::new(telemetry.registry().clone()),
            telemetry,
            tracer,
            connections: LiveConnections::new(),
            owner,
        })
    }

    /// Replaces the routes and policies.
    pub fn set_l7(&self, config: L7Config) {
        *self.l7.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// The routes and policies in force.
    pub fn l7(&self) -> Arc<L7Config> {
        lock_read(&self.l7).clone()
    }

    /// Live destination state (outlier ejections, pools).
    pub fn traffic(&self) -> &crate::traffic::TrafficState {
        &self.traffic
    }

    /// The TCP connections proxied at L4 right now, for the admin `/config_dump`.
    pub fn connections(&self) -> &LiveConnections {
        &self.connections
    }

    /// The settings.
    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// The waypoint's own workload, when the control plane sent it.
    fn own_workload(&self) -> Option<Arc<Workload>> {
        let ip = self.settings.instance_ip?;
        self.state
            .index()
            .workload_by_ip(&self.settings.network, ip)
            .cloned()
    }

    fn resolve(&self, authority: SocketAddr) -> Option<Dest> {
        let index = self.state.index();
        match index.find_address(&self.settings.network, authority.ip())? {
            Address::Service(service) => {
                let protocol = port_protocol(&service, authority.port())?;
                Some(Dest::Service {
                    service,
                    port: authority.port(),
                    protocol,
                })
            }
            Address::Workload(workload) => Some(Dest::Workload {
                workload,
                port: authority.port(),
            }),
        }
    }

    /// Handles one CONNECT: resolves it, accepts it, and serves what it carries.
    pub async fn serve_tunnel(self: Arc<Self>, request: InboundRequest, responder: Responder) {
        let Ok(dst) = request.authority.parse::<SocketAddr>() else {
            tracing::debug!(authority = %request.authority, "CONNECT authority is not ip:port");
            responder.refuse(StatusCode::BAD_REQUEST);
            return;
        };
        let Some(target) = self.resolve(dst) else {
            tracing::info!(authority = %dst, peer = %request.peer.identity(), "CONNECT to an address this waypoint does not know (not a Service VIP:port or a pod IP)");
            responder.refuse(StatusCode::BAD_REQUEST);
            return;
        };
        let stream = match responder.accept(HeaderMap::new()) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "client went away before the tunnel was accepted");
                return;
            }
        };
        let source = self
            .state
            .index()
            .workload_by_ip(&self.settings.network, request.remote_addr.ip())
            .cloned();
        let policy_targets = policy_targets(
            &self.settings.gateway,
            Some(&self.settings.gateway_class),
            match &target {
                Dest::Service { service, .. } => Some(service.key.as_ref()),
                Dest::Workload { .. } => None,
            },
        );
        let conn = Arc::new(Conn {
            peer: request.peer,
            src: request.remote_addr,
            dst,
            target,
            source,
            policy_targets,
        });
        let declared = match &conn.target {
            Dest::Service { protocol, .. } => *protocol,
            Dest::Workload { .. } => PortProtocol::Unknown,
        };
        let (detected, io): (Detected, Box<dyn crate::upstream::Io>) = match declared {
            PortProtocol::Http1 => (Detected::Http1, Box::new(stream)),
            PortProtocol::Http2 => (Detected::Http2, Box::new(stream)),
            PortProtocol::Tcp => (Detected::Tcp, Box::new(stream)),
            PortProtocol::Unknown => {
                let mut stream = stream;
                match sniff::sniff(&mut stream, self.settings.sniff_timeout).await {
                    Ok((detected, seen)) => (detected, Box::new(Prefixed::new(seen, stream))),
                    Err(error) => {
                        tracing::debug!(%error, "tunnel failed while sniffing");
                        return;
                    }
                }
            }
        };
        match detected {
            Detected::Http1 => self.serve_http(conn, io, false).await,
            Detected::Http2 => self.serve_http(conn, io, true).await,
            Detected::Tcp => self.serve_tcp(conn, io).await,
        }
    }

    async fn serve_http<IO>(self: Arc<Self>, conn: Arc<Conn>, io: IO, h2: bool)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let proxy = self.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let proxy = proxy.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(proxy.handle_request(&conn, request).await) }
        });
        let io = TokioIo::new(io);
        // Like Envoy's codec AUTO: a port declared HTTP/1.1 still takes an HTTP/2 preface
        // (curl --http2-prior-knowledge), and a sniffed one was already classified.
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20);
        let builder = if h2 { builder.http2_only() } else { builder };
        let result = builder.serve_connection_with_upgrades(io, service).await;
        if let Err(error) = result {
            tracing::debug!(%error, "downstream HTTP connection ended with an error");
        }
    }

    /// One HTTP request, start to answer.
    async fn handle_request(
        &self,
        conn: &Conn,
        mut request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        ensure_request_id(request.headers_mut());
        let closing = closes_connection(&request);
        let span = self.start_span(conn, &mut request);
        let principal = conn.peer.identity().to_string();
        let initial = self
            .telemetry
            .labels(conn.source.as_ref(), &principal, None, None);
        let mut guard = RequestGuard::start(
            self.telemetry.registry(),
            initial,
            conn.src,
            request.method(),
            request.uri(),
            request.headers(),
        );
        let request_bytes = Arc::new(AtomicU64::new(0));
        let request = request.map(|b| crate::telemetry::counted_request(b, request_bytes.clone()));
        let mut routed = Routed {
            trace: span,
            ..Routed::default()
        };
        let mut flags = ResponseFlags::NONE;
        let response = match self.forward(conn, request, &mut routed).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "request not forwarded");
                guard.fail(&error);
                flags |= error.response_flag();
                error.response()
            }
        };
        let destination = routed.destination.as_ref();
        let service = routed.service.as_ref();
        guard.set_labels(self.telemetry.labels(
            conn.source.as_ref(),
            &principal,
            destination,
            service,
        ));
        if let Some(upstream) = routed.upstream {
            guard.set_upstream(upstream);
        }
        if !routed.flags.is_empty() {
            guard.fail_with(routed.flags, "see response_flags");
        }
        flags |= routed.flags;
        let span = routed.trace.take().map(|mut span| {
            span.set("response_flags", flags.as_label().into_owned());
            let cluster = routed.cluster.take().unwrap_or_else(|| "-".to_string());
            span.set("upstream_cluster", cluster.clone());
            span.set("upstream_cluster.name", cluster);
            if let Some(upstream) = routed.upstream {
                span.set("upstream_address", upstream.to_string());
            }
            (self.tracer.clone(), span)
        });
        let mut response = response;
        if closing {
            // RFC 9112 9.6: the connection closes after this response, and the response says so,
            // so the client opens its next connection at once instead of sending its next
            // request into one that is closing.
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        crate::telemetry::finish(guard, request_bytes, response, span)
    }

    /// The request's server span, when it is traced (see [`crate::tracing`]); makes sure the
    /// request carries a `traceparent` either way.
    fn start_span(
        &self,
        conn: &Conn,
        request: &mut Request<Incoming>,
    ) -> Option<crate::tracing::ActiveSpan> {
        // Built only for a sampled request: most are not.
        let target = || match &conn.target {
            Dest::Service { service, port, .. } => (service.hostname.to_string(), *port),
            Dest::Workload { port, .. } => (conn.dst.ip().to_string(), *port),
        };
        let mut span = self.tracer.start(request.headers_mut(), || {
            let (target, port) = target();
            format!("{target}:{port}/*")
        })?;
        let (target, _) = target();
        let headers = request.headers();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let host = headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_else(|| target.clone());
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        span.set("http.url", format!("http://{host}{path}"));
        span.set("http.method", request.method().as_str());
        span.set("http.protocol", format!("{:?}", request.version()));
        span.set("guid:x-request-id", text("x-request-id"));
        span.set("user_agent", text("user-agent"));
        span.set("downstream_cluster", "-");
        span.set("peer.address", conn.src.ip().to_string());
        span.set("upstream_cluster", "-");
        Some(span)
    }

    async fn forward(
        &self,
        conn: &Conn,
        request: Request<RequestBody>,
        meta: &mut Routed,
    ) -> Result<Response<ResponseBody>, RequestError> {
        let l7 = self.l7();
        if let Dest::Service { service, .. } = &conn.target {
            // Counted against the Service addressed until routing picks a backend Service.
            meta.service = Some(service.clone());
        }
        let (mut parts, body) = request.into_parts();
        // Authorization first: a refused request learns nothing about routes.
        let ctx = ConnectionContext::verified(conn.src.ip(), &conn.peer, conn.dst);
        let host = filters::request_host(&parts).unwrap_or_default();
        let decision = {
            let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let rctx = ctx.with_request(parts.method.as_str(), path, &host, &parts.headers);
            l7.policies.authorize_targets(&conn.policy_targets, &rctx)
        };
        if !decision.audited.is_empty() || !decision.dry_run.is_empty() {
            tracing::info!(target: "access", audited = ?decision.audited, dry_run = ?decision.dry_run, "policy audit or dry-run match");
        }
        if !decision.allowed {
            return Err(RequestError::Denied {
                policy: decision.policy().map(str::to_string),
            });
        }

        let (service, port) = match &conn.target {
            Dest::Workload { workload, port } => {
                let endpoint = workload_endpoint(workload, *port, None);
                meta.destination = Some(workload.clone());
                meta.upstream = Some(endpoint.addr);
                meta.cluster = Some(format!("inbound-pod|{port}||{}", endpoint.addr.ip()));
                let protocol = if is_grpc(&parts.headers) {
                    Protocol::Http2
                } else {
                    downstream_protocol(&parts)
                };
                return self
                    .send(parts, body, endpoint, protocol, None, Vec::new(), None)
                    .await;
            }
            Dest::Service { service, port, .. } => (service.clone(), *port),
        };

        let path = parts.uri.path().to_string();
        let query = parts.uri.query().map(str::to_string);
        let decided = {
            let view = RequestView {
                method: parts.method.as_str(),
                path: &path,
                query: query.as_deref(),
                headers: &parts.headers,
                grpc: is_grpc(&parts.headers),
            };
            l7.routes.decide(&service.key, port, &view)
        };
        let mut applied = Applied::default();
        let rule = match decided {
            Decision::NoRoutes => None,
            Decision::NoMatch => {
                return Err(RequestError::NoRoute {
                    service: service.hostname.to_string(),
                    method: parts.method.to_string(),
                    path,
                });
            }
            Decision::Matched(matched) => {
                let rule = matched.rule.clone();
                meta.route = Some(format!("{}#{}", rule.route, rule.index));
                let prefix = matched.matched_prefix.clone();
                filters::apply_request(&rule.filters, &mut parts, prefix.as_deref(), &mut applied);
                if let Some(redirect) = applied.redirect.take() {
                    return Ok(redirect.map(|()| empty()));
                }
                if let Some(policy) = &rule.cors {
                    match filters::cors(policy, &parts) {
                        filters::Cors::Preflight(answer) => return Ok(answer.map(|()| empty())),
                        filters::Cors::Allow(headers) => applied.response.push(headers),
                        filters::Cors::None => {}
                    }
                }
                if let Some(fault) = &rule.fault
                    && let Some(answer) = self.inject_fault(fault, &parts, meta).await
                {
                    return Ok(answer);
                }
                Some((rule, prefix))
            }
        };
        let timeouts = rule.as_ref().map_or((None, None), |(r, _)| {
            (r.request_timeout, r.backend_timeout)
        });
        let routed = self.send_routed(conn, parts, body, &service, port, rule, applied, meta);
        match timeouts.0 {
            Some(limit) => tokio::time::timeout(limit, routed)
                .await
                .map_err(|_| RequestError::Timeout(limit))?,
            None => routed.await,
        }
    }

    /// Fault injection: a delay, then possibly an abort, each for its percentage of requests.
    async fn inject_fault(
        &self,
        fault: &ambit_proto::waypoint::Fault,
        parts: &http::request::Parts,
        meta: &mut Routed,
    ) -> Option<Response<ResponseBody>> {
        let rng_roll = || rand::rng().random_range(0.0..100.0);
        if let Some(delay) = fault
            .delay
            .as_ref()
            .and_then(|d| Duration::try_from(*d).ok())
            .filter(|_| fault.delay_percent > 0.0 && rng_roll() < fault.delay_percent)
        {
            meta.flags |= ResponseFlags::DELAY_INJECTED;
            tokio::time::sleep(delay).await;
        }
        if fault.abort_percent > 0.0 && rng_roll() < fault.abort_percent {
            meta.flags |= ResponseFlags::FAULT_INJECTED;
            let mut response = Response::new(full(Bytes::from_static(b"fault filter abort\n")));
            if fault.abort_grpc || is_grpc(&parts.headers) && fault.abort_http_status == 0 {
                // A trailers-only gRPC answer.
                *response.body_mut() = empty();
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert("grpc-status", HeaderValue::from(fault.abort_grpc_status));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
            } else {
                *response.status_mut() = u16::try_from(fault.abort_http_status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            }
            response
                .headers_mut()
                .insert("x-ambit-response-flags", HeaderValue::from_static("FI"));
            return Some(response);
        }
        None
    }

    /// Chooses the backend, endpoint and protocol for each try and sends it, retrying as the
    /// rule allows (same rule's backends, another endpoint when there is one, replayable bodies
    /// only, within the retry budget); reports every try's outcome to outlier detection.
    #[allow(clippy::too_many_arguments)]
    async fn send_routed(
        &self,
        conn: &Conn,
        parts: http::request::Parts,
        body: RequestBody,
        service: &Arc<Service>,
        port: u16,
        rule: Option<(Arc<crate::routes::Rule>, Option<String>)>,
        applied: Applied,
        meta: &mut Routed,
    ) -> Result<Response<ResponseBody>, RequestError> {
        let l7 = self.l7();
        let retry = rule.as_ref().and_then(|(r, _)| r.retry.clone());
        let per_try = retry
            .as_ref()
            .and_then(|r| r.per_try_timeout)
            .or_else(|| rule.as_ref().and_then(|(r, _)| r.backend_timeout));
        // Only a body known to be small (no body, or a declared length within the limit) is
        // read ahead for replay: reading a stream of unknown length first could wait forever on
        // a client that expects an answer before it sends more (gRPC streaming).
        let replayable = body.is_end_stream()
            || body
                .size_hint()
                .upper()
                .is_some_and(|upper| upper <= crate::retry::REPLAY_LIMIT as u64);
        let mut body = if retry.is_some() && replayable {
            crate::retry::Replayable::read(body, crate::retry::REPLAY_LIMIT).await
        } else {
            crate::retry::Replayable::Streaming(body)
        };
        for mirror in &applied.mirrors {
            self.mirror(mirror, &parts);
        }
        let mut original = Some(parts);
        let local = self.own_workload();
        let attempts = retry.as_ref().map_or(0, |r| r.attempts);
        let mut previous: Option<Arc<str>> = None;
        let mut retry_slot: Option<crate::traffic::InFlight> = None;
        let mut tries = 0u32;
        loop {
            tries += 1;
            // The backend: the route's weighted choice (again on every try, among the same
            // rule's backends), else the Service addressed.
            // Without retries there is one try, which takes the request head itself; with retries
            // every try gets a copy.
            let head = if retry.is_some() {
                original.as_ref().map(clone_parts)
            } else {
                original.take()
            };
            let Some(mut try_parts) = head else {
                return Err(RequestError::InvalidBackend(
                    "the request was already sent".to_string(),
                ));
            };
            let mut try_applied = Applied::default();
            let (backend_service, backend_port, subset) = match &rule {
                None => (service.clone(), port, None),
                Some((rule, prefix)) => {
                    let roll = |total: u32| rand::rng().random_range(0..total);
                    let Some(backend) = rule.choose(roll) else {
                        return Err(RequestError::InvalidBackend(format!(
                            "{} rule {}: no backend with a weight above 0",
                            rule.route, rule.index
                        )));
                    };
                    if let Some(why) = &backend.invalid {
                        return Err(RequestError::InvalidBackend(format!(
                            "{} rule {}: backend is invalid: {why}",
                            rule.route, rule.index
                        )));
                    }
                    filters::apply_request(
                        &backend.filters,
                        &mut try_parts,
                        prefix.as_deref(),
                        &mut try_applied,
                    );
                    if let Some(redirect) = try_applied.redirect.take() {
                        return Ok(redirect.map(|()| empty()));
                    }
                    let found = self.state.index().service(&backend.service).cloned();
                    let Some(backend_service) = found else {
                        return Err(RequestError::InvalidBackend(format!(
                            "{} rule {}: backend Service {} is unknown to this waypoint",
                            rule.route, rule.index, backend.service
                        )));
                    };
                    (backend_service, backend.port, backend.subset.clone())
                }
            };
            let policy =
                l7.destinations
                    .policy(&backend_service.key, backend_port, subset.as_deref());
            let hash = match &policy.balance {
                crate::traffic::Balance::Hash(key) => crate::traffic::hash_of(
                    key,
                    &try_parts.headers,
                    try_parts.uri.query(),
                    conn.src.ip(),
                ),
                _ => None,
            };
            let chosen = self.traffic.choose(
                &self.state.index(),
                &l7.destinations,
                &backend_service,
                backend_port,
                subset.as_deref(),
                conn.source.as_deref(),
                &policy,
                hash,
                previous.as_deref(),
                local.as_deref(),
            );
            let chosen = match chosen {
                Ok(chosen) => chosen,
                Err(crate::traffic::ChooseError::UnknownSubset { service, subset }) => {
                    return Err(RequestError::InvalidBackend(format!(
                        "subset {subset} of {service} is not defined by a DestinationRule"
                    )));
                }
                Err(crate::traffic::ChooseError::NoEndpoint) => {
                    return Err(RequestError::NoHealthyUpstream {
                        service: backend_service.hostname.to_string(),
                        port: backend_port,
                    });
                }
            };
            meta.destination = Some(chosen.workload.clone());
            meta.service = Some(backend_service.clone());
            let endpoint = workload_endpoint(&chosen.workload, chosen.port, Some(&backend_service));
            meta.upstream = Some(endpoint.addr);
            // gRPC needs HTTP/2 (trailers) whatever the port says; h2UpgradePolicy UPGRADE asks
            // for it; otherwise the port's declared version, else the client's.
            let protocol = match port_protocol(&backend_service, backend_port) {
                _ if is_grpc(&try_parts.headers) || policy.pool.h2_upgrade => Protocol::Http2,
                Some(PortProtocol::Http2) => Protocol::Http2,
                Some(PortProtocol::Http1) => Protocol::Http1,
                _ => downstream_protocol(&try_parts),
            };
            let destination = format!(
                "{}:{backend_port}{}",
                backend_service.hostname,
                subset
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            );
            let Some(_admitted) =
                self.traffic
                    .admit(&destination, &policy.pool, protocol == Protocol::Http2)
            else {
                return Err(RequestError::Overflow(destination));
            };
            let Some(try_body) = body.take() else {
                return Err(RequestError::InvalidBackend(
                    "the request body cannot be sent again".to_string(),
                ));
            };
            let cluster = format!(
                "inbound-vip|{backend_port}|http{}|{}",
                subset
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                backend_service.hostname
            );
            // The try's client span; the backend sees it as the parent in `traceparent`.
            let try_span = meta.trace.as_ref().map(|server| {
                let mut span =
                    server.child(format!("router {cluster} egress"), &mut try_parts.headers);
                span.set("upstream_cluster", cluster.clone());
                span.set("upstream_address", endpoint.addr.to_string());
                span.set("http.method", try_parts.method.as_str());
                span.set_int("retry.attempt", i64::from(tries - 1));
                span
            });
            meta.cluster = Some(cluster);
            let mut all_applied = applied.response.clone();
            all_applied.extend(try_applied.response);
            let result = self
                .send(
                    try_parts,
                    try_body,
                    endpoint,
                    protocol,
                    per_try,
                    all_applied,
                    Some(&policy.pool.connections),
                )
                .await;
            // A retry's slot in the budget is held until its try has ended.
            drop(retry_slot.take());
            let outcome = match &result {
                Ok(response) => crate::traffic::TryOutcome::Status(response.status().as_u16()),
                Err(_) => crate::traffic::TryOutcome::LocalFailure,
            };
            if let Some(mut span) = try_span {
                let status = match &result {
                    Ok(response) => response.status().as_u16(),
                    Err(error) => {
                        span.set(
                            "response_flags",
                            error.response_flag().as_label().into_owned(),
                        );
                        span.set("error.message", error.to_string());
                        0
                    }
                };
                self.tracer.end(span, status);
            }
            self.traffic.report(
                &self.state.index(),
                &backend_service,
                backend_port,
                &chosen.workload,
                &policy,
                outcome,
            );
            drop(chosen);
            let Some(retry) = &retry else {
                return result;
            };
            let retriable = match &result {
                Ok(response) => retry.retries_status(
                    response.status().as_u16(),
                    response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                ),
                Err(RequestError::Connect(_)) => retry.retries_connect_failure(),
                Err(RequestError::Reset(_) | RequestError::Timeout(_)) => retry.retries_reset(),
                Err(_) => false,
            };
            if !retriable {
                return result;
            }
            if tries > attempts || !body.can_replay() {
                if tries > 1 {
                    meta.flags |= ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
                }
                return result;
            }
            let Some(slot) = self.traffic.admit_retry(&destination, &policy.pool) else {
                meta.flags |= ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
                return result;
            };
            // The retry counts against the budget until its try has ended.
            retry_slot = Some(slot);
            previous = meta.destination.as_ref().map(|w| w.uid.clone());
            tokio::time::sleep(retry.backoff(tries)).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        parts: http::request::Parts,
        body: RequestBody,
        endpoint: Endpoint,
        protocol: Protocol,
        timeout: Option<Duration>,
        response_modifiers: Vec<ambit_proto::waypoint::HeaderModifier>,
        limits: Option<&ConnLimits>,
    ) -> Result<Response<ResponseBody>, RequestError> {
        let upgrade = protocol == Protocol::Http1 && parts.headers.contains_key(UPGRADE);
        let request = Request::from_parts(parts, body);
        if upgrade {
            return self.upgrade(request, endpoint).await;
        }
        let limits = limits.copied().unwrap_or_default();
        let sending = self
            .upstreams
            .send_with(&endpoint, protocol, request, &limits);
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, sending)
                .await
                .map_err(|_| RequestError::Timeout(limit))?,
            None => sending.await,
        };
        let response = result.map_err(upstream_error)?;
        let (mut parts, body) = response.into_parts();
        // The backend's connection management is not the client's (a backend's
        // `Connection: close` must not close the client's connection).
        crate::upstream::strip_hop_by_hop(&mut parts.headers);
        for modifier in &response_modifiers {
            filters::modify_headers(&mut parts.headers, modifier);
        }
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ))
    }

    /// HTTP/1.1 Upgrade (WebSocket and the like): forwarded on a connection of its own; on 101
    /// both sides are spliced.
    async fn upgrade(
        &self,
        mut request: Request<RequestBody>,
        endpoint: Endpoint,
    ) -> Result<Response<ResponseBody>, RequestError> {
        let downstream = hyper::upgrade::on(&mut request);
        let mut response = self
            .upstreams
            .send_unpooled(&endpoint, request)
            .await
            .map_err(upstream_error)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((down, up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            });
        }
        let (parts, body) = response.into_parts();
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ))
    }

    /// Sends a copy of a request's head (the body streams only to the real backend) to the
    /// mirror backend, ignoring the answer.
    fn mirror(&self, mirror: &ambit_proto::waypoint::RequestMirror, parts: &http::request::Parts) {
        let chosen = mirror.denominator == 0
            || rand::rng().random_range(0..mirror.denominator) < mirror.numerator;
        let Some(backend) = mirror.backend.as_ref().filter(|_| chosen) else {
            return;
        };
        let Ok(port) = u16::try_from(backend.port) else {
            return;
        };
        let picked = {
            let index = self.state.index();
            index.service(&backend.service).and_then(|s| {
                index
                    .pick_endpoint(s, port, None)
                    .map(|(w, t)| workload_endpoint(&w, t, Some(s)))
            })
        };
        let Some(endpoint) = picked else {
            tracing::debug!(backend = %backend.service, "mirror backend has no endpoint");
            return;
        };
        let mut copy = Request::new(empty_request_body());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.headers_mut() = parts.headers.clone();
        copy.headers_mut().remove(http::header::CONTENT_LENGTH);
        copy.headers_mut().remove(http::header::TRANSFER_ENCODING);
        // Envoy marks shadowed requests by suffixing the host with "-shadow".
        if let Some(host) = filters::request_host(parts)
            && let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow"))
        {
            copy.headers_mut().insert(HOST, v);
        }
        let upstreams = self.upstreams.clone();
        let protocol = downstream_protocol(parts);
        tokio::spawn(async move {
            match upstreams.send(&endpoint, protocol, copy).await {
                Ok(response) => {
                    let _ = response.into_body().collect().await;
                }
                Err(error) => tracing::debug!(%error, "mirror request failed"),
            }
        });
    }

    /// L4: authorize the connection, pick an endpoint, splice.
    async fn serve_tcp(self: Arc<Self>, conn: Arc<Conn>, mut io: Box<dyn crate::upstream::Io>) {
        let l7 = self.l7();
        let ctx = ConnectionContext::verified(conn.src.ip(), &conn.peer, conn.dst);
        let decision = l7.policies.authorize_targets(&conn.policy_targets, &ctx);
        let principal = conn.peer.identity().to_string();
        let resolved: Result<Resolved, RequestError> = if !decision.allowed {
            Err(RequestError::Denied {
                policy: decision.policy().map(str::to_string),
            })
        } else {
            match &conn.target {
                Dest::Workload { workload, port } => Ok((
                    workload_endpoint(workload, *port, None),
                    workload.clone(),
                    None,
                    None,
                )),
                Dest::Service { service, port, .. } => {
                    self.tcp_endpoint(&l7, &conn, service, *port)
                }
            }
        };
        let (destination, service) = match &resolved {
            Ok((_, w, s, _)) => (Some(w.clone()), s.clone()),
            Err(_) => (None, None),
        };
        let service = service.or_else(|| match &conn.target {
            Dest::Service { service, .. } => Some(service.clone()),
            Dest::Workload { .. } => None,
        });
        let labels = self.telemetry.labels(
            conn.source.as_ref(),
            &principal,
            destination.as_ref(),
            service.as_ref(),
        );
        let mut guard =
            ConnectionGuard::open(self.telemetry.registry(), labels, conn.src, conn.dst);
        let (endpoint, connect_timeout) = match resolved {
            Ok((endpoint, _, _, connect_timeout)) => (endpoint, connect_timeout),
            Err(error) => {
                let flags = match error {
                    RequestError::Denied { .. } => ResponseFlags::DENY,
                    _ => error.response_flag(),
                };
                guard.fail_with(flags, &error);
                return;
            }
        };
        guard.set_upstream(endpoint.addr);
        let dialing = self.dial.dial(&endpoint);
        let dialed = match connect_timeout {
            Some(limit) => tokio::time::timeout(limit, dialing)
                .await
                .unwrap_or_else(|_| {
                    Err(UpstreamError::Connect {
                        endpoint: endpoint.addr,
                        reason: format!(
                            "connect timeout ({limit:?}, connectionPool.tcp.connectTimeout)"
                        ),
                    })
                }),
            None => dialing.await,
        };
        let mut upstream = match dialed {
            Ok(io) => io,
            Err(error) => {
                guard.fail_with(ResponseFlags::CONNECT, &error);
                return;
            }
        };
        // Listed in the live-connections table until it ends, with the copy's own byte counts.
        guard.track(&self.connections, self.owner.clone());
        let counters = Arc::new(ambit_hbone::copy::ByteCounters::new());
        let live = counters.clone();
        guard.watch_bytes(Box::new(move || (live.a_to_b(), live.b_to_a())));
        let copied = ambit_hbone::copy::copy_bidirectional(&mut io, &mut upstream, &counters).await;
        guard.record_bytes(counters.a_to_b(), counters.b_to_a());
        if let Err(error) = copied {
            guard.fail_with(ResponseFlags::CONNECT, &error);
        }
    }
}

impl Proxy {
    /// Where a TCP connection to `service` goes: a VirtualService `tcp` rule's weighted backend
    /// (and subset) when one applies, else the Service itself; then an endpoint under the
    /// destination's policy (subsets, load balancing, ejections).
    fn tcp_endpoint(
        &self,
        l7: &L7Config,
        conn: &Conn,
        service: &Arc<Service>,
        port: u16,
    ) -> Result<Resolved, RequestError> {
        let (target, target_port, subset) = match l7.routes.tcp_rule(&service.key, port) {
            None => (service.clone(), port, None),
            Some(rule) => {
                let roll = |total: u32| rand::rng().random_range(0..total);
                let backend = rule.choose(roll).ok_or_else(|| {
                    RequestError::InvalidBackend(format!(
                        "{} rule {}: no backend with a weight above 0",
                        rule.route, rule.index
                    ))
                })?;
                let found = self.state.index().service(&backend.service).cloned();
                let target = found.ok_or_else(|| {
                    RequestError::InvalidBackend(format!(
                        "{} rule {}: backend Service {} is unknown to this waypoint",
                        rule.route, rule.index, backend.service
                    ))
                })?;
                (target, backend.port, backend.subset.clone())
            }
        };
        let policy = l7
            .destinations
            .policy(&target.key, target_port, subset.as_deref());
        let chosen = self
            .traffic
            .choose(
                &self.state.index(),
                &l7.destinations,
                &target,
                target_port,
                subset.as_deref(),
                conn.source.as_deref(),
                &policy,
                None,
                None,
                self.own_workload().as_deref(),
            )
            .map_err(|e| match e {
                crate::traffic::ChooseError::UnknownSubset { service, subset } => {
                    RequestError::InvalidBackend(format!(
                        "subset {subset} of {service} is not defined by a DestinationRule"
                    ))
                }
                crate::traffic::ChooseError::NoEndpoint => RequestError::NoHealthyUpstream {
                    service: target.hostname.to_string(),
                    port: target_port,
                },
            })?;
        Ok((
            workload_endpoint(&chosen.workload, chosen.port, Some(&target)),
            chosen.workload.clone(),
            Some(target),
            policy.pool.connections.connect_timeout,
        ))
    }
}

/// A copy of a request's head for one try.
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    let (mut copy, ()) = request.into_parts();
    // Upgrades (WebSocket) are never retried, so the extensions the first try needs move with it.
    copy.extensions = parts.extensions.clone();
    copy
}

/// A TCP tunnel's endpoint, the pod behind it, the Service addressed and the destination's
/// connect timeout.
type Resolved = (
    Endpoint,
    Arc<Workload>,
    Option<Arc<Service>>,
    Option<Duration>,
);

/// Where a request went, for its metrics and log.
#[derive(Debug, Default)]
struct Routed {
    /// The Service it went to (after routing).
    service: Option<Arc<Service>>,
    /// The pod chosen.
    destination: Option<Arc<Workload>>,
    /// `podIP:targetPort`.
    upstream: Option<SocketAddr>,
    /// `HTTPRoute/ns/name#rule`.
    route: Option<String>,
    /// Flags of what happened on the way (retries exhausted, faults injected).
    flags: ResponseFlags,
    /// The Envoy-style name of the destination (`inbound-vip|80|http/v1|host`), for traces.
    cluster: Option<String>,
    /// The request's server span, when traced: each upstream try is a child of it.
    trace: Option<crate::tracing::ActiveSpan>,
}

fn empty_request_body() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn upstream_error(error: UpstreamError) -> RequestError {
    if error.is_connect() {
        RequestError::Connect(error)
    } else {
        RequestError::Reset(error)
    }
}

/// The HTTP version the client used, spoken to the backend when its port declares none.
fn downstream_protocol(parts: &http::request::Parts) -> Protocol {
    if parts.version == http::Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    }
}

/// True for gRPC requests.
/// Whether the client's HTTP/1 connection ends with this request: `Connection: close`, or
/// HTTP/1.0 without `Connection: keep-alive`.
fn closes_connection<B>(request: &Request<B>) -> bool {
    let tokens = || {
        request
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    match request.version() {
        http::Version::HTTP_11 => tokens().any(|t| t.eq_ignore_ascii_case("close")),
        http::Version::HTTP_10 | http::Version::HTTP_09 => {
            !tokens().any(|t| t.eq_ignore_ascii_case("keep-alive"))
        }
        _ => false,
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Where a request to `workload` on `port` goes, and who may answer: the pod, plus the SANs
/// of `service` when the request was routed through one.
fn workload_endpoint(workload: &Workload, port: u16, service: Option<&Service>) -> Endpoint {
    let ip = workload
        .addresses
        .first()
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let mut identities = vec![workload.identity().to_string()];
    if let Some(service) = service {
        identities.extend(service.subject_alt_names.iter().map(|s| s.to_string()));
    }
    Endpoint {
        addr: SocketAddr::new(ip, port),
        identities,
        service: service.map(|s| s.hostname.clone()),
    }
}

/// Adds `x-request-id` and a W3C `traceparent` when the client sent none.
pub fn ensure_request_ids(headers: &mut HeaderMap) {
    ensure_request_id(headers);
    if !headers.contains_key("traceparent") {
        let mut rng = rand::rng();
        let trace: u128 = rng.random_range(1..=u128::MAX);
        let span: u64 = rng.random_range(1..=u64::MAX);
        if let Ok(v) = HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-01")) {
            headers.insert("traceparent", v);
        }
    }
}

/// Adds `x-request-id` when the client sent none.
fn ensure_request_id(headers: &mut HeaderMap) {
    let mut rng = rand::rng();
    if !headers.contains_key("x-request-id") {
        let id: u128 = rng.random();
        let b = id.to_be_bytes();
        let text = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
            (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
            u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
        );
        if let Ok(v) = HeaderValue::from_str(&text) {
            headers.insert("x-request-id", v);
        }
    }
}
