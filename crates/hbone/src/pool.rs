//! The client side: a pool of HTTP/2 connections keyed by [`PoolKey`], each carrying many CONNECT
//! streams. It owns dialing (one dial at a time per key, so a burst of new tunnels waits for one
//! connection instead of opening a storm of them), stream limits, keepalive and idle release.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ambit_identity::Identity;
use ambit_identity::tls::VerifiedPeer;
use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{H2Config, PoolConfig};
use crate::dialer::{BoxedIo, Dialer};
use crate::error::HboneError;
use crate::keepalive;
use crate::stream::HboneStream;

/// What makes two tunnels share a connection: the same source identity presented, the same set of
/// acceptable server identities, the same next hop and the same downstream source IP. Different
/// `:authority` values with the same key share connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity our side presents (the source workload's).
    pub src_id: Identity,
    /// Server identities we accept; the TLS handshake fails for anyone else.
    pub dst_ids: Vec<Identity>,
    /// The next hop, normally `<pod or waypoint IP>:15008`.
    pub dst: SocketAddr,
    /// The downstream client's IP; keeps different source pods' traffic on separate connections.
    pub src: IpAddr,
}

/// One tunnel to open: the `:authority` (`ip:port`, `[ipv6]:port` or `host:port`) and extra
/// request headers (`baggage`, `forwarded`, `traceparent`, ... are the caller's business).
#[derive(Clone, Debug, Default)]
pub struct ConnectRequest {
    /// The tunnel's target.
    pub authority: String,
    /// Extra request headers.
    pub headers: HeaderMap,
}

impl ConnectRequest {
    /// A request for `authority` with no extra headers.
    pub fn new(authority: impl Into<String>) -> Self {
        Self {
            authority: authority.into(),
            headers: HeaderMap::new(),
        }
    }
}

/// A snapshot of the pool, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections currently in the pool (usable or still carrying streams).
    pub connections: usize,
    /// Streams currently open through the pool.
    pub open_streams: usize,
    /// Connections dialed since the pool was created.
    pub connections_opened: u64,
}

/// A pool of HBONE connections. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct PoolInner {
    config: PoolConfig,
    dialer: Arc<dyn Dialer>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyConnections>>>,
    counters: Arc<Counters>,
    next_connection_id: AtomicU64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicUsize,
    open_streams: AtomicUsize,
    connections_opened: AtomicU64,
}

/// The connections of one key.
#[derive(Default)]
struct KeyConnections {
    /// Held by whoever is dialing for this key; the others wait and then reuse its connection.
    dial_lock: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Arc<PooledConnection>>>,
}

/// One HTTP/2 connection in the pool.
struct PooledConnection {
    id: u64,
    send_request: SendRequest<Bytes>,
    peer: VerifiedPeer,
    dst: SocketAddr,
    stream_limit: u32,
    usage: Arc<Usage>,
}

/// Stream count and liveness of one connection, shared with its driver task and its streams.
struct Usage {
    state: watch::Sender<UsageState>,
}

#[derive(Clone, Copy, Debug, Default)]
struct UsageState {
    open_streams: u32,
    /// No new streams: the connection ended, failed, or was released from the pool.
    retired: bool,
}

impl Usage {
    fn new() -> Self {
        Self {
            state: watch::Sender::new(UsageState::default()),
        }
    }

    /// Takes a stream slot if the connection is live and below `limit`.
    fn try_claim(&self, limit: u32) -> bool {
        self.state.send_if_modified(|state| {
            let free = !state.retired && state.open_streams < limit;
            if free {
                state.open_streams += 1;
            }
            free
        })
    }

    fn release(&self) {
        self.state.send_modify(|state| {
            state.open_streams = state.open_streams.saturating_sub(1);
        });
    }

    fn retire(&self) {
        self.state
            .send_if_modified(|state| !std::mem::replace(&mut state.retired, true));
    }

    /// Retires the connection only if no stream is open, so a stream claimed at the last moment
    /// keeps its connection in the pool.
    fn retire_if_idle(&self) -> bool {
        self.state.send_if_modified(|state| {
            let idle = state.open_streams == 0;
            if idle {
                state.retired = true;
            }
            idle
        }) || self.state.borrow().retired
    }
}

/// One open stream's claim on its connection; released when the [`HboneStream`] is dropped.
pub(crate) struct StreamSlot {
    usage: Arc<Usage>,
    counters: Arc<Counters>,
}

impl StreamSlot {
    fn new(usage: Arc<Usage>, counters: Arc<Counters>) -> Self {
        counters.open_streams.fetch_add(1, Ordering::Relaxed);
        Self { usage, counters }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.usage.release();
        self.counters.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PooledConnection {
    /// The most streams we open at once: our limit, lowered by the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    fn effective_limit(&self) -> u32 {
        let peer_limit =
            u32::try_from(self.send_request.current_max_send_streams()).unwrap_or(u32::MAX);
        self.stream_limit.min(peer_limit)
    }
}

impl KeyConnections {
    fn claim(&self, counters: &Arc<Counters>) -> Option<(Arc<PooledConnection>, StreamSlot)> {
        let connections = lock(&self.connections);
        connections.iter().find_map(|connection| {
            connection
                .usage
                .try_claim(connection.effective_limit())
                .then(|| {
                    let slot = StreamSlot::new(Arc::clone(&connection.usage), Arc::clone(counters));
                    (Arc::clone(connection), slot)
                })
        })
    }
}

/// A connection checked out for one stream.
struct Checkout {
    connection: Arc<PooledConnection>,
    slot: StreamSlot,
    reused: bool,
}

impl Pool {
    /// A pool that dials new connections through `dialer`.
    pub fn new(config: PoolConfig, dialer: Arc<dyn Dialer>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                config,
                dialer,
                keys: Mutex::new(HashMap::new()),
                counters: Arc::default(),
                next_connection_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a CONNECT stream for `request.authority` over a pooled connection for `key`, dialing
    /// one if none has room. Waiting for the response has no deadline of its own (the server
    /// answers after connecting to the target); wrap the call in a timeout if needed.
    pub async fn connect(
        &self,
        key: PoolKey,
        request: ConnectRequest,
    ) -> Result<HboneStream, HboneError> {
        let mut nothing = EarlyData::new(None::<&mut tokio::io::Empty>, 0);
        self.open(key, &request, &mut nothing).await
    }

    /// [`connect`](Self::connect), sending the client's first bytes without waiting for the
    /// server's answer: while the CONNECT is unanswered, whatever `client` has sent (up to `limit`
    /// bytes) goes out as DATA right after the request, so the server can hand it to the target as
    /// soon as it has connected instead of after one more round trip (HTTP/2 lets a client send a
    /// request body before the response). Returns the tunnel and how many bytes were already sent
    /// through it; the rest of `client`'s bytes are the caller's to copy.
    ///
    /// If the server refuses the CONNECT, the bytes sent are discarded with the stream and the
    /// status is the error, as with `connect`. If a reused connection refuses the stream unread
    /// (it was closing), the tunnel is opened on another connection and the same bytes are sent
    /// again, once. A failed read from `client` is [`HboneError::EarlyData`].
    pub async fn connect_with_early_data<R>(
        &self,
        key: PoolKey,
        request: ConnectRequest,
        client: &mut R,
        limit: usize,
    ) -> Result<(HboneStream, u64), HboneError>
    where
        R: AsyncRead + Unpin,
    {
        let mut early = EarlyData::new(Some(client), limit);
        let stream = self.open(key, &request, &mut early).await?;
        Ok((stream, early.total as u64))
    }

    async fn open<R>(
        &self,
        key: PoolKey,
        request: &ConnectRequest,
        early: &mut EarlyData<'_, R>,
    ) -> Result<HboneStream, HboneError>
    where
        R: AsyncRead + Unpin,
    {
        let http_request = connect_request(request)?;
        let checkout = self.checkout(&key).await?;
        let reused = checkout.reused;
        match open_stream(checkout, http_request, &request.authority, early).await {
            Err(OpenError::Refused(error)) if reused => {
                // A reused connection may have been closing (GOAWAY) as we picked it; the server
                // did not process the stream, so one retry on another connection is safe (with the
                // same early bytes: the refused stream delivered none of them).
                debug!(%error, dst = %key.dst, "pooled connection refused a new stream; retrying");
                let checkout = self.checkout(&key).await?;
                open_stream(
                    checkout,
                    connect_request(request)?,
                    &request.authority,
                    early,
                )
                .await
                .map_err(OpenError::into_error)
            }
            result => result.map_err(OpenError::into_error),
        }
    }

    /// Live connection and stream counts.
    pub fn stats(&self) -> PoolStats {
        let counters = &self.inner.counters;
        PoolStats {
            connections: counters.connections.load(Ordering::Relaxed),
            open_streams: counters.open_streams.load(Ordering::Relaxed),
            connections_opened: counters.connections_opened.load(Ordering::Relaxed),
        }
    }

    fn key_connections(&self, key: &PoolKey) -> Arc<KeyConnections> {
        let mut keys = lock(&self.inner.keys);
        Arc::clone(keys.entry(key.clone()).or_default())
    }

    async fn checkout(&self, key: &PoolKey) -> Result<Checkout, HboneError> {
        let counters = &self.inner.counters;
        let entry = self.key_connections(key);
        if let Some((connection, slot)) = entry.claim(counters) {
            return Ok(Checkout {
                connection,
                slot,
                reused: true,
            });
        }
        let _dialing = entry.dial_lock.lock().await;
        // Whoever held the lock before us may have dialed a connection with room for us too.
        if let Some((connection, slot)) = entry.claim(counters) {
            return Ok(Checkout {
                connection,
                slot,
                reused: true,
            });
        }
        let timeout = self.inner.config.connect_timeout;
        let connection = tokio::time::timeout(timeout, self.dial(key))
            .await
            .map_err(|_elapsed| HboneError::ConnectTimeout {
                dst: key.dst,
                timeout,
            })??;
        let connection = Arc::new(connection);
        let claimed = connection
            .usage
            .try_claim(connection.effective_limit().max(1));
        debug_assert!(claimed, "a fresh connection has room for one stream");
        let slot = StreamSlot::new(Arc::clone(&connection.usage), Arc::clone(counters));
        lock(&entry.connections).push(Arc::clone(&connection));
        counters.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(release_when_idle(
            Arc::downgrade(&self.inner),
            key.clone(),
            connection.id,
            Arc::clone(&connection.usage),
        ));
        Ok(Checkout {
            connection,
            slot,
            reused: false,
        })
    }

    /// Dials, runs the HTTP/2 handshake and spawns the connection's driver task.
    async fn dial(&self, key: &PoolKey) -> Result<PooledConnection, HboneError> {
        let inner = &self.inner;
        let (io, peer) = inner
            .dialer
            .dial(key)
            .await
            .map_err(|source| HboneError::Dial {
                dst: key.dst,
                source,
            })?;
        let stream_limit = inner.config.max_streams_per_connection.max(1);
        let (send_request, connection) = inner
            .config
            .h2
            .client_builder(stream_limit)
            .handshake::<BoxedIo, Bytes>(io)
            .await
            .map_err(|source| HboneError::Handshake {
                peer: key.dst,
                source,
            })?;
        let id = inner.next_connection_id.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let usage = Arc::new(Usage::new());
        tokio::spawn(drive_connection(
            connection,
            inner.config.h2.clone(),
            key.dst,
            id,
            Arc::clone(&usage),
        ));
        debug!(connection = id, dst = %key.dst, peer = %peer.identity(), "HBONE connection established");
        Ok(PooledConnection {
            id,
            send_request,
            peer,
            dst: key.dst,
            stream_limit,
            usage,
        })
    }
}

/// Polls the connection (which moves all its streams' frames) and pings it; marks it retired
/// when it ends so the pool stops handing it out.
async fn drive_connection(
    mut connection: h2::client::Connection<BoxedIo, Bytes>,
    h2: H2Config,
    dst: SocketAddr,
    id: u64,
    usage: Arc<Usage>,
) {
    let keepalive = keepalive::ping_until_unanswered(
        connection.ping_pong(),
        h2.keepalive_interval,
        h2.keepalive_timeout,
    );
    let result = tokio::select! {
        result = &mut connection => result.map_err(|source| HboneError::Connection { peer: dst, source }),
        () = keepalive => Err(HboneError::KeepaliveTimeout { peer: dst, timeout: h2.keepalive_timeout }),
    };
    usage.retire();
    match result {
        Ok(()) => debug!(connection = id, %dst, "HBONE connection closed"),
        Err(error) => warn!(connection = id, %dst, %error, "HBONE connection ended with an error"),
    }
}

/// Waits until the connection has had no streams for `idle_release`, or has ended, then removes
/// it from the pool. Dropping the pool's handle lets h2 close the connection once the last stream
/// ends.
async fn release_when_idle(pool: Weak<PoolInner>, key: PoolKey, id: u64, usage: Arc<Usage>) {
    let Some(idle_release) = pool.upgrade().map(|pool| pool.config.idle_release) else {
        return;
    };
    let mut state = usage.state.subscribe();
    loop {
        let Ok(now) = state
            .wait_for(|s| s.retired || s.open_streams == 0)
            .await
            .map(|s| *s)
        else {
            break;
        };
        if now.retired {
            break;
        }
        let busy_again = state.wait_for(|s| s.retired || s.open_streams > 0);
        if tokio::time::timeout(idle_release, busy_again)
            .await
            .is_err()
            && usage.retire_if_idle()
        {
            debug!(connection = id, dst = %key.dst, "releasing idle HBONE connection");
            break;
        }
    }
    if let Some(pool) = pool.upgrade() {
        remove_connection(&pool, &key, id);
    }
}

fn remove_connection(pool: &PoolInner, key: &PoolKey, id: u64) {
    let mut keys = lock(&pool.keys);
    let Some(entry) = keys.get(key) else {
        return;
    };
    let now_empty = {
        let mut connections = lock(&entry.connections);
        let before = connections.len();
        connections.retain(|connection| connection.id != id);
        if connections.len() < before {
            pool.counters.connections.fetch_sub(1, Ordering::Relaxed);
        }
        connections.is_empty()
    };
    // Only the map holds the entry when nobody is checking out or dialing for this key.
    if now_empty && Arc::strong_count(entry) == 1 {
        keys.remove(key);
    }
}

/// Why opening a stream on a checked-out connection failed.
enum OpenError {
    /// The stream was never processed by the server (connection closing); safe to retry.
    Refused(HboneError),
    Other(HboneError),
}

impl OpenError {
    fn into_error(self) -> HboneError {
        match self {
            Self::Refused(error) | Self::Other(error) => error,
        }
    }
}

/// The client's first bytes, read and sent while a CONNECT waits for its answer.
struct EarlyData<'a, R> {
    /// Where they come from; `None` once it reached EOF (or for a plain `connect`).
    client: Option<&'a mut R>,
    limit: usize,
    buffer: BytesMut,
    /// Everything sent so far (shared with h2, not copied), to send again on a retry.
    sent: Vec<Bytes>,
    total: usize,
}

/// Bytes read from the client per early read.
const EARLY_READ: usize = 4096;

impl<'a, R: AsyncRead + Unpin> EarlyData<'a, R> {
    fn new(client: Option<&'a mut R>, limit: usize) -> Self {
        Self {
            client,
            limit,
            buffer: BytesMut::new(),
            sent: Vec::new(),
            total: 0,
        }
    }

    fn wants_more(&self) -> bool {
        self.client.is_some() && self.total < self.limit
    }

    /// The next bytes the client sent; `None` at its EOF (reading stops there: the copy that
    /// follows sees the EOF again). Cancel safe: nothing is read unless it completes.
    async fn read(&mut self) -> std::io::Result<Option<Bytes>> {
        let Some(client) = self.client.as_mut() else {
            return std::future::pending().await;
        };
        let room = self.limit.saturating_sub(self.total).min(EARLY_READ);
        if self.buffer.capacity() < room {
            self.buffer.reserve(EARLY_READ);
        }
        let read = client.read_buf(&mut (&mut self.buffer).limit(room)).await?;
        if read == 0 {
            self.client = None;
            return Ok(None);
        }
        let chunk = self.buffer.split().freeze();
        self.total += read;
        self.sent.push(chunk.clone());
        Ok(Some(chunk))
    }
}

async fn open_stream<R: AsyncRead + Unpin>(
    checkout: Checkout,
    request: http::Request<()>,
    authority: &str,
    early: &mut EarlyData<'_, R>,
) -> Result<HboneStream, OpenError> {
    let Checkout {
        connection, slot, ..
    } = checkout;
    let request_error = |source: h2::Error| HboneError::Request {
        authority: authority.to_owned(),
        dst: connection.dst,
        source,
    };
    let refused = |source: h2::Error| {
        connection.usage.retire();
        OpenError::Refused(request_error(source))
    };
    let mut sender = connection
        .send_request
        .clone()
        .ready()
        .await
        .map_err(refused)?;
    let (response, mut send) = sender.send_request(request, false).map_err(refused)?;
    // Bytes already sent on a stream the server refused unread go again, in order.
    let mut send_failed = early
        .sent
        .iter()
        .find_map(|chunk| send.send_data(chunk.clone(), false).err());
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            biased;
            response = &mut response => break response,
            read = early.read(), if send_failed.is_none() && early.wants_more() => match read {
                // h2 buffers DATA beyond the window and sends it after the HEADERS as the
                // peer's windows allow.
                Ok(Some(chunk)) => send_failed = send.send_data(chunk, false).err(),
                Ok(None) => {}
                Err(source) => {
                    return Err(OpenError::Other(HboneError::EarlyData {
                        authority: authority.to_owned(),
                        source,
                    }));
                }
            },
        }
    };
    let response = response.map_err(|source| {
        if source.reason() == Some(h2::Reason::REFUSED_STREAM) {
            refused(source)
        } else {
            OpenError::Other(request_error(source))
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Other(HboneError::Status(response.status())));
    }
    if let Some(source) = send_failed {
        // Accepted, but part of what the client sent could not follow: the stream is broken.
        return Err(OpenError::Other(request_error(source)));
    }
    let (parts, recv) = response.into_parts();
    Ok(HboneStream::new(
        send,
        recv,
        parts.headers,
        connection.peer.clone(),
        Some(slot),
    ))
}

/// An RFC 9113 §8.5 CONNECT: `:method` and `:authority` only (h2 leaves out `:scheme`/`:path`).
fn connect_request(request: &ConnectRequest) -> Result<http::Request<()>, HboneError> {
    let invalid = || HboneError::InvalidAuthority {
        authority: request.authority.clone(),
    };
    let authority = http::uri::Authority::from_str(&request.authority).map_err(|_| invalid())?;
    if authority.port_u16().is_none() || authority.as_str().contains('@') {
        return Err(invalid());
    }
    let mut parts = http::uri::Parts::default();
    parts.authority = Some(authority);
    let uri = Uri::from_parts(parts).map_err(|_| invalid())?;
    let mut http_request = http::Request::new(());
    *http_request.method_mut() = Method::CONNECT;
    *http_request.uri_mut() = uri;
    *http_request.version_mut() = Version::HTTP_2;
    *http_request.headers_mut() = request.headers.clone();
    Ok(http_request)
}

/// Locks a std mutex, recovering from poisoning: the data under these locks (connection lists)
/// stays consistent even if a holder panicked, since every update is a single push or retain.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_is_authority_form() {
        let request = connect_request(&ConnectRequest::new("10.0.0.1:8080")).unwrap();
        assert_eq!(request.method(), Method::CONNECT);
        assert_eq!(request.uri().to_string(), "10.0.0.1:8080");
        assert!(request.uri().scheme().is_none());
        let v6 = connect_request(&ConnectRequest::new("[fd00::1]:80")).unwrap();
        assert_eq!(v6.uri().authority().unwrap().as_str(), "[fd00::1]:80");
        let host = connect_request(&ConnectRequest::new("echo.ns.svc.cluster.local:80")).unwrap();
        assert_eq!(host.uri().host(), Some("echo.ns.svc.cluster.local"));
    }

    #[test]
    fn connect_request_rejects_authorities_without_port() {
        for bad in ["10.0.0.1", "", "/path", "user@host:80", "host:port"] {
            let error = connect_request(&ConnectRequest::new(bad)).unwrap_err();
            assert!(
                error.to_string().contains("invalid HBONE :authority"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn usage_claims_up_to_the_limit_and_not_after_retirement() {
        let usage = Usage::new();
        assert!(usage.try_claim(2));
        assert!(usage.try_claim(2));
        assert!(!usage.try_claim(2));
        assert!(
            !usage.retire_if_idle(),
            "busy connections are not retired for idleness"
        );
        usage.release();
        usage.release();
        assert!(usage.retire_if_idle());
        assert!(!usage.try_claim(2));
    }
}
