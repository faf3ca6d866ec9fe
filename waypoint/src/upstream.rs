//! HTTP connections to backends: HTTP/1.1 or HTTP/2 over a byte stream the [`Dial`] opens (in
//! production an HBONE tunnel to the chosen pod), pooled per endpoint and protocol.
//!
//! - HTTP/2: one multiplexed connection per endpoint, redialled when it closes.
//! - HTTP/1.1: idle connections kept per endpoint; a connection goes back to the pool when its
//!   response body has been read to the end, and is dropped (closed) when the body is abandoned.
//! - Dialling is serialized per endpoint, so a burst of requests to a cold endpoint opens one
//!   connection for HTTP/2 instead of a storm.
//! - Connections to a pod are kept per Service routed to as well: the tunnel names the Service to
//!   the pod's ztunnel (`forwarded: host=`) for its metrics.
//! - A destination's DestinationRule shapes its connections ([`ConnLimits`]): `connectTimeout`
//!   bounds opening one (tunnel and HTTP handshake: a failure is a connect failure, `UF`),
//!   `maxRequestsPerConnection` retires a connection once it carried that many requests (HTTP/1.1:
//!   not returned to the pool; HTTP/2: no new stream on it, the ones in flight finish), and
//!   `idleTimeout` closes a pooled connection that carried nothing for that long. The limits of
//!   the request that uses a connection apply to it (connections are pooled per endpoint, and
//!   two subsets with different policies may share one).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use thiserror::Error;

/// Error type of request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type sent upstream.
pub type RequestBody = BoxBody<Bytes, BoxError>;

/// A byte stream to a backend.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed byte stream.
pub type BoxedIo = Box<dyn Io>;

/// The HTTP version spoken to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge, cleartext inside the tunnel).
    Http2,
}

/// Opens byte streams to backends.
pub trait Dial: Send + Sync + 'static {
    /// A new stream to `endpoint` (`podIP:targetPort`).
    fn dial(
        &self,
        endpoint: &Endpoint,
    ) -> Pin<Box<dyn Future<Output = Result<BoxedIo, UpstreamError>> + Send>>;
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `podIP:targetPort`: the HBONE authority.
    pub addr: SocketAddr,
    /// Identities the backend may prove (the pod's, plus the Service's SANs).
    pub identities: Vec<String>,
    /// The hostname of the Service the request was routed to (`None` for pod-addressed
    /// traffic): the tunnel names it in `forwarded: host=` so the destination's ztunnel reports
    /// it as `destination_service`. Connections are pooled per service as well as per pod.
    pub service: Option<Arc<str>>,
}

/// Why a request could not be sent or answered.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The tunnel or connection to the backend could not be opened.
    #[error("could not connect to {endpoint}: {reason}")]
    Connect {
        /// The backend.
        endpoint: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {endpoint} failed: {source}")]
    Handshake {
        /// The backend.
        endpoint: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The backend reset or closed the connection before answering.
    #[error("{endpoint} reset the request: {source}")]
    Reset {
        /// The backend.
        endpoint: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// True when the failure happened before anything was sent (safe to report as a connect
    /// failure, flag `UF`); otherwise the backend reset (`UR`).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. }
        )
    }
}

/// How a destination's connections are opened, reused and closed (DestinationRule
/// `connectionPool`); the default leaves everything to the pool's own defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnLimits {
    /// `tcp.connectTimeout`: opening a connection (tunnel and HTTP handshake) takes at most this.
    pub connect_timeout: Option<Duration>,
    /// `http.maxRequestsPerConnection` (0: unlimited).
    pub max_requests_per_connection: u32,
    /// `http.idleTimeout`: a pooled connection that carried no request for this long is closed.
    pub idle_timeout: Option<Duration>,
}

impl ConnLimits {
    /// True when a connection that already carried `uses` requests may take no more.
    fn spent(&self, uses: u32) -> bool {
        self.max_requests_per_connection != 0 && uses >= self.max_requests_per_connection
    }
}

/// Connections are pooled per pod address, Service (the tunnel names it: see
/// [`Endpoint::service`]), protocol and data-path worker ([`crate::worker`]): a connection's task
/// runs on the worker that opened it, and only that worker's requests use it.
type Key = (SocketAddr, Option<Arc<str>>, Protocol, usize);

/// An idle HTTP/1.1 connection: `uses` requests carried so far (and its generation: a reaper
/// closes it only if it was not used again since it went idle).
struct IdleH1 {
    sender: http1::SendRequest<RequestBody>,
    id: u64,
    uses: u32,
}

/// The HTTP/2 connection of an endpoint.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    id: u64,
    uses: u32,
    activity: Arc<Activity>,
    /// An idle reaper watches it.
    reaped: bool,
}

/// Streams in flight on an HTTP/2 connection and when the last one ended.
struct Activity {
    active: AtomicUsize,
    /// Milliseconds since `epoch` when the connection last carried a stream.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn stamp(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long the connection has carried nothing (zero while a stream is in flight).
    fn idle_for(&self) -> Duration {
        if self.active.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Counts one stream on an HTTP/2 connection until dropped (with the response body).
struct StreamGuard(Arc<Activity>);

impl StreamGuard {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::Relaxed);
        activity.stamp();
        Self(activity.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct PerKey {
    h2: Option<H2Conn>,
    idle_h1: Vec<IdleH1>,
}

/// Backend connections. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

struct Inner {
    dial: Arc<dyn Dial>,
    keys: Mutex<HashMap<Key, PerKey>>,
    dial_locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    max_idle_per_endpoint: usize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a pooled HTTP/1.1 connection may take to become ready for its next request.
const READY_WAIT: Duration = Duration::from_secs(1);

impl Upstreams {
    /// Backend connections opened through `dial`.
    pub fn new(dial: Arc<dyn Dial>) -> Self {
        Self {
            inner: Arc::new(Inner {
                dial,
                keys: Mutex::new(HashMap::new()),
                dial_locks: Mutex::new(HashMap::new()),
                max_idle_per_endpoint: 64,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Sends `request` to `endpoint` with `protocol`. The request's URI is turned into the form
    /// the protocol needs (origin-form and `Host` for HTTP/1.1; scheme + `:authority` from the
    /// Host for HTTP/2), keeping the host the client asked for.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.send_with(endpoint, protocol, request, &ConnLimits::default())
            .await
    }

    /// [`send`](Self::send) under a destination's connection limits.
    pub async fn send_with(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        request: Request<RequestBody>,
        limits: &ConnLimits,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let request = shape(request, protocol);
        let key = (
            endpoint.addr,
            endpoint.service.clone(),
            protocol,
            crate::worker::current(),
        );
        match protocol {
            Protocol::Http2 => {
                let (mut sender, activity) = self.h2_sender(endpoint, key, limits).await?;
                let stream = StreamGuard::enter(&activity);
                let response =
                    sender
                        .send_request(request)
                        .await
                        .map_err(|source| UpstreamError::Reset {
                            endpoint: endpoint.addr,
                            source,
                        })?;
                Ok(response.map(|body| UpstreamBody::new(body, None, Some(stream))))
            }
            Protocol::Http1 => {
                let (mut sender, id, uses) = self.h1_sender(endpoint, &key, limits).await?;
                let response =
                    sender
                        .send_request(request)
                        .await
                        .map_err(|source| UpstreamError::Reset {
                            endpoint: endpoint.addr,
                            source,
                        })?;
                let pooled = IdleH1 { sender, id, uses };
                Ok(self.return_on_end(key, pooled, *limits, response))
            }
        }
    }

    /// Sends an HTTP/1.1 request on a connection of its own that is never pooled (Upgrade).
    pub async fn send_unpooled(
        &self,
        endpoint: &Endpoint,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let request = shape(request, Protocol::Http1);
        let mut sender = self.dial_h1(endpoint, &ConnLimits::default()).await?;
        sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Reset {
                endpoint: endpoint.addr,
                source,
            })
    }

    fn dial_lock(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.dial_locks)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    async fn h2_sender(
        &self,
        endpoint: &Endpoint,
        key: Key,
        limits: &ConnLimits,
    ) -> Result<(http2::SendRequest<RequestBody>, Arc<Activity>), UpstreamError> {
        if let Some(live) = self.live_h2(&key, limits) {
            return Ok(live);
        }
        let dial_lock = self.dial_lock(&key);
        let _dialing = dial_lock.lock().await;
        if let Some(live) = self.live_h2(&key, limits) {
            return Ok(live);
        }
        let opening = async {
            let io = self.inner.dial.dial(endpoint).await?;
            http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| UpstreamError::Handshake {
                    endpoint: endpoint.addr,
                    source,
                })
        };
        let (sender, connection) = within(limits.connect_timeout, endpoint, opening).await?;
        let addr = endpoint.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Activity::new();
        activity.stamp();
        if limits.spent(1) {
            // One request per connection: never pooled.
            return Ok((sender, activity));
        }
        lock(&self.inner.keys).entry(key.clone()).or_default().h2 = Some(H2Conn {
            sender: sender.clone(),
            id,
            uses: 1,
            activity: activity.clone(),
            reaped: limits.idle_timeout.is_some(),
        });
        if let Some(idle) = limits.idle_timeout {
            self.reap_h2(key, id, activity.clone(), idle);
        }
        Ok((sender, activity))
    }

    /// The endpoint's HTTP/2 connection, if it is open and may take one more request (counted).
    /// A connection given its `maxRequestsPerConnection`th request is retired: forgotten by the
    /// pool, it closes once its streams in flight end.
    fn live_h2(
        &self,
        key: &Key,
        limits: &ConnLimits,
    ) -> Option<(http2::SendRequest<RequestBody>, Arc<Activity>)> {
        let (live, reap) = {
            let mut keys = lock(&self.inner.keys);
            let entry = keys.get_mut(key)?;
            match &mut entry.h2 {
                Some(conn) if !conn.sender.is_closed() && !limits.spent(conn.uses) => {
                    conn.uses += 1;
                    // A connection opened without an idle timeout gets one from the first
                    // request that has it.
                    let reap = match limits.idle_timeout {
                        Some(idle) if !conn.reaped => {
                            conn.reaped = true;
                            Some((conn.id, idle))
                        }
                        _ => None,
                    };
                    let live = (conn.sender.clone(), conn.activity.clone());
                    if limits.spent(conn.uses) {
                        // That was its last request: retired now, it closes when it ends.
                        entry.h2 = None;
                    }
                    (live, reap)
                }
                _ => {
                    entry.h2 = None;
                    return None;
                }
            }
        };
        if let Some((id, idle)) = reap {
            self.reap_h2(key.clone(), id, live.1.clone(), idle);
        }
        Some(live)
    }

    /// Closes the HTTP/2 connection `id` of `key` once it has carried no stream for `idle`.
    /// Ends when the connection is gone from the pool (closed, retired or reaped).
    fn reap_h2(&self, key: Key, id: u64, activity: Arc<Activity>, idle: Duration) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut wait = idle;
            loop {
                tokio::time::sleep(wait).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let mut keys = lock(&inner.keys);
                let Some(entry) = keys.get_mut(&key) else {
                    return;
                };
                let current = entry
                    .h2
                    .as_ref()
                    .is_some_and(|c| c.id == id && !c.sender.is_closed());
                if !current {
                    return;
                }
                let quiet = activity.idle_for();
                if quiet >= idle {
                    tracing::debug!(addr = %key.0, ?idle, "closing an idle upstream HTTP/2 connection");
                    entry.h2 = None;
                    return;
                }
                wait = idle - quiet;
            }
        });
    }

    async fn h1_sender(
        &self,
        endpoint: &Endpoint,
        key: &Key,
        limits: &ConnLimits,
    ) -> Result<(http1::SendRequest<RequestBody>, u64, u32), UpstreamError> {
        // Bounded by the idle connections held (each is popped once).
        loop {
            let candidate = lock(&self.inner.keys)
                .get_mut(key)
                .and_then(|e| e.idle_h1.pop());
            let Some(IdleH1 {
                mut sender,
                id,
                uses,
            }) = candidate
            else {
                break;
            };
            if sender.is_closed() || limits.spent(uses) {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Ok((sender, id, uses + 1));
            }
        }
        let sender = self.dial_h1(endpoint, limits).await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Ok((sender, id, 1))
    }

    async fn dial_h1(
        &self,
        endpoint: &Endpoint,
        limits: &ConnLimits,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let opening = async {
            let io = self.inner.dial.dial(endpoint).await?;
            http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| UpstreamError::Handshake {
                    endpoint: endpoint.addr,
                    source,
                })
        };
        let (sender, connection) = within(limits.connect_timeout, endpoint, opening).await?;
        let addr = endpoint.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%addr, %error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    fn return_on_end(
        &self,
        key: Key,
        pooled: IdleH1,
        limits: ConnLimits,
        response: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        let (parts, body) = response.into_parts();
        if body.is_end_stream() {
            self.give_back(key, pooled, &limits);
            return Response::from_parts(parts, UpstreamBody::new(body, None, None));
        }
        // The body gives the connection back when it is read to the end; a body abandoned
        // before its end drops it (with an unread response in it, the connection closes).
        let back = GiveBack {
            upstreams: self.clone(),
            key,
            pooled,
            limits,
        };
        Response::from_parts(parts, UpstreamBody::new(body, Some(back), None))
    }

    /// Returns an HTTP/1.1 connection to the idle pool, unless it is closed or spent (then it
    /// is dropped, which closes it); with an idle timeout, it is closed if still idle then.
    fn give_back(&self, key: Key, pooled: IdleH1, limits: &ConnLimits) {
        if pooled.sender.is_closed() || limits.spent(pooled.uses) {
            return;
        }
        let (id, uses) = (pooled.id, pooled.uses);
        {
            let mut keys = lock(&self.inner.keys);
            let idle = &mut keys.entry(key.clone()).or_default().idle_h1;
            if idle.len() >= self.inner.max_idle_per_endpoint {
                return;
            }
            idle.push(pooled);
        }
        if let Some(after) = limits.idle_timeout {
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let mut keys = lock(&inner.keys);
                if let Some(entry) = keys.get_mut(&key) {
                    // Still idle since then: the same connection with the same count of uses.
                    let before = entry.idle_h1.len();
                    entry.idle_h1.retain(|c| !(c.id == id && c.uses == uses));
                    if entry.idle_h1.len() < before {
                        tracing::debug!(addr = %key.0, idle = ?after, "closed an idle upstream HTTP/1.1 connection");
                    }
                }
            });
        }
    }
}

/// Runs `opening` (a tunnel and an HTTP handshake) within `limit`, if any; running out is a
/// connect failure.
async fn within<T>(
    limit: Option<Duration>,
    endpoint: &Endpoint,
    opening: impl Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match limit {
        None => opening.await,
        Some(limit) => {
            tokio::time::timeout(limit, opening)
                .await
                .map_err(|_| UpstreamError::Connect {
                    endpoint: endpoint.addr,
                    reason: format!(
                        "connect timeout ({limit:?}, connectionPool.tcp.connectTimeout)"
                    ),
                })?
        }
    }
}

/// Puts the request in the form `protocol` needs, keeping the host the client asked for.
/// Removes the hop-by-hop headers of one connection: the fixed set, and any header the
/// `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value that passes (gRPC needs it end to end).
    let trailers_only = headers
        .get(http::header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    if !trailers_only {
        headers.remove(http::header::TE);
    }
}

fn shape(mut request: Request<RequestBody>, protocol: Protocol) -> Request<RequestBody> {
    let host = request
        .headers()
        .get(http::header::HOST)
        .cloned()
        .or_else(|| {
            request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    // Shared with the request's URI (not parsed again: the path is often the longest part).
    let path_and_query = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // Hop-by-hop headers describe the client's connection, not ours to the backend (RFC 9110
    // 7.6.1): a client's `Connection: close` must not close the pooled upstream connection.
    // An Upgrade keeps its `Connection`/`Upgrade` pair, which is the point of the request.
    let upgrade =
        protocol == Protocol::Http1 && request.headers().contains_key(http::header::UPGRADE);
    if !upgrade {
        strip_hop_by_hop(request.headers_mut());
    }
    match protocol {
        Protocol::Http1 => {
            *request.version_mut() = http::Version::HTTP_11;
            // Origin form; a request that already is (the usual HTTP/1.1 one) is left alone.
            if request.uri().scheme().is_some() || request.uri().authority().is_some() {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(path_and_query);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
            if let Some(host) = host {
                request.headers_mut().insert(http::header::HOST, host);
            }
        }
        Protocol::Http2 => {
            *request.version_mut() = http::Version::HTTP_2;
            let authority = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
                .to_string();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
            {
                *request.uri_mut() = uri;
            }
            request.headers_mut().remove(http::header::HOST);
        }
    }
    request
}

/// A backend's response body; for HTTP/1.1 it tells the pool its connection is free once read to
/// the end.
pub struct UpstreamBody {
    inner: Incoming,
    done: Option<GiveBack>,
    /// Keeps the HTTP/2 stream counted as in flight (idle timeout) until the body is dropped.
    _stream: Option<StreamGuard>,
}

/// An HTTP/1.1 connection to return to its pool once its response body has been read.
struct GiveBack {
    upstreams: Upstreams,
    key: Key,
    pooled: IdleH1,
    limits: ConnLimits,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.done.is_some())
            .finish()
    }
}

impl UpstreamBody {
    fn new(inner: Incoming, done: Option<GiveBack>, stream: Option<StreamGuard>) -> Self {
        Self {
            inner,
            done,
            _stream: stream,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // Read to the end: either the end was polled, or the last frame said so (hyper does not
        // poll again a body that reports its end).
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended && let Some(back) = self.done.take() {
            back.upstreams
                .give_back(back.key, back.pooled, &back.limits);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
