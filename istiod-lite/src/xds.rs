//! The delta xDS server for `istio.workload.Address` and `istio.security.Authorization` (every
//! client) and `ambit.waypoint.v1.Route` and `ambit.waypoint.v1.Policy` (each waypoint only its
//! own, named by its Gateway in the Node metadata `GATEWAY_NAME`/`GATEWAY_NAMESPACE`). Each
//! stream tracks what its client holds: it starts from the versions the client reports, sends
//! only what differs (always answering a new subscription, even with nothing, because a client
//! waits for a response per type before it is ready), and after every debounced change sends
//! exactly the resources that changed and the names that disappeared, or left its scope.
//!
//! A client that subscribes holding nothing (every ztunnel of a cluster that starts at once) is
//! sent the whole set of a type as encoded and compressed once per store generation
//! ([`crate::store::EncodedSet`]): [`service`] writes the gRPC frames itself instead of letting
//! tonic encode and gzip each message per stream. The response is the stream's own fields (type
//! URL and its own nonce, so ACKs match per stream as before) encoded in front of the shared
//! `resources` bytes; with gzip, those fields go in a stored deflate block ahead of the shared
//! deflate blocks in one gzip member, whose CRC combines both. Every other response (a resume
//! from held versions, deltas, the waypoint types) is computed, encoded and compressed for its
//! stream as before.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambit_core::metrics::Registry;
use ambit_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, SERVICE_NAME,
};
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ambit_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, DESTINATION_POLICY_TYPE_URL, L7_POLICY_TYPE_URL,
    ROUTE_TYPE_URL,
};
use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec as _, CompressionEncoding, Streaming};
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::store::{EncodedSet, Entry, Snapshot, Store};

/// The ADS service.
#[derive(Clone, Debug)]
pub struct XdsServer {
    /// Resources.
    pub store: Store,
    /// Who may connect.
    pub auth: Authenticator,
    /// Metrics.
    pub metrics: Registry,
    /// Quiet time after a change before pushing (coalesces bursts).
    pub debounce: Duration,
    /// Cancelled when istiod-lite shuts down: every open stream then ends (its client reconnects,
    /// to another replica if there is one) and new ones are refused with `Unavailable`, so that
    /// the gRPC server's graceful shutdown is not held open by streams that never end by
    /// themselves.
    pub shutdown: CancellationToken,
}

/// The gRPC service around `server`: responses are gzip-compressed for clients that accept it
/// (only when the client's `grpc-accept-encoding` names gzip, so upstream ztunnel, which does
/// not, gets plain messages), requests may be compressed, and large requests (a reconnect listing
/// every held resource) are accepted. Fresh subscribers share each generation's encoded set.
pub fn service(server: XdsServer) -> AdsService {
    AdsService {
        server: Arc::new(server),
        max_decoding_message_size: 16 << 20,
    }
}

/// The ADS gRPC service as mounted by istiod-lite (see [`service`]). The generated
/// `AggregatedDiscoveryServiceServer<XdsServer>` also works, but encodes and compresses every
/// response per stream.
#[derive(Clone, Debug)]
pub struct AdsService {
    server: Arc<XdsServer>,
    max_decoding_message_size: usize,
}

impl AdsService {
    /// The largest request accepted (decompressed); 16 MiB unless changed.
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = limit;
        self
    }
}

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl<B> tonic::codegen::Service<http::Request<B>> for AdsService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            if request.uri().path() != DELTA_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} is not served (only delta ADS)",
                    request.uri().path()
                ))
                .into_http());
            }
            Ok(match server.open_framed(request, limit).await {
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The `grpc-encoding` of a request: gzip, or none.
fn request_encoding(headers: &http::HeaderMap) -> Result<Option<CompressionEncoding>, Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(None),
        Some(b"gzip") => Ok(Some(CompressionEncoding::Gzip)),
        Some(other) => {
            let mut status = Status::unimplemented(format!(
                "requests compressed with {:?} are not accepted (gzip or identity)",
                String::from_utf8_lossy(other)
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("gzip"),
            );
            Err(status)
        }
    }
}

/// Whether the client's `grpc-accept-encoding` names gzip.
fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("grpc-accept-encoding")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim() == "gzip")
}

/// Registers the server's metric help texts.
pub fn describe_metrics(metrics: &Registry) {
    metrics.describe_gauge(
        "ambit_xds_connected_proxies",
        "Proxies with an open xDS stream",
    );
    metrics.describe_counter("ambit_xds_pushes_total", "xDS responses sent, by type URL");
    metrics.describe_counter(
        "ambit_xds_pushed_resources_total",
        "Resources sent in xDS responses, by type URL",
    );
    metrics.describe_counter(
        "ambit_xds_nacks_total",
        "xDS responses NACKed by clients, by type URL",
    );
    metrics.describe_histogram(
        "ambit_xds_push_latency_seconds",
        "Time from a configuration change to its push on a stream",
    );
}

fn known_type(type_url: &str) -> Option<&'static str> {
    [
        ADDRESS_TYPE_URL,
        AUTHORIZATION_TYPE_URL,
        ROUTE_TYPE_URL,
        L7_POLICY_TYPE_URL,
        DESTINATION_POLICY_TYPE_URL,
    ]
    .into_iter()
    .find(|t| *t == type_url)
}

/// Node metadata naming a waypoint's Gateway.
pub const GATEWAY_NAME: &str = "GATEWAY_NAME";
/// Node metadata naming the namespace of a waypoint's Gateway.
pub const GATEWAY_NAMESPACE: &str = "GATEWAY_NAMESPACE";

/// The Gateway (`<namespace>/<name>`) a client's Node metadata names, if it is a waypoint.
pub fn node_gateway(node: &ambit_proto::envoy_core::Node) -> Option<String> {
    let fields = &node.metadata.as_ref()?.fields;
    let text = |key: &str| match fields.get(key)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    Some(format!(
        "{}/{}",
        text(GATEWAY_NAMESPACE)?,
        text(GATEWAY_NAME)?
    ))
}

/// One gRPC message as written on the wire (its 5-byte prefix included), in parts so that a
/// shared encoded set goes out without being copied.
type Frame = Vec<Bytes>;

/// Where a session's responses go.
enum Sink {
    /// Written as gRPC frames by us ([`service`]), gzip-compressed when the client accepts it.
    Frames {
        tx: mpsc::Sender<Result<Frame, Status>>,
        gzip: bool,
    },
    /// Messages for tonic's generated server, which encodes (and compresses) each one itself.
    Messages(mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>),
}

/// Why a response could not be put in a frame.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("a {type_url} response of {len} bytes exceeds the gRPC limit of 4 GiB")]
    TooLarge { type_url: String, len: usize },
    #[error("compressing a {type_url} response: {source}")]
    Compress {
        type_url: String,
        source: std::io::Error,
    },
}

/// gzip member header: deflate, no flags, no mtime, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The 5-byte gRPC message prefix: compressed flag and big-endian length.
fn grpc_prefix(compressed: bool, len: usize, type_url: &str) -> Result<[u8; 5], FrameError> {
    let len = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        type_url: type_url.to_string(),
        len,
    })?;
    let mut prefix = [0u8; 5];
    prefix[0] = u8::from(compressed);
    prefix[1..].copy_from_slice(&len.to_be_bytes());
    Ok(prefix)
}

/// A message encoded (and gzipped) for this stream alone.
fn frame_message(response: &DeltaDiscoveryResponse, gzip: bool) -> Result<Frame, FrameError> {
    let encoded = response.encode_to_vec();
    let payload = if gzip {
        let compress = |source| FrameError::Compress {
            type_url: response.type_url.clone(),
            source,
        };
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(encoded.len() / 4 + 32),
            flate2::Compression::new(6),
        );
        encoder.write_all(&encoded).map_err(compress)?;
        encoder.finish().map_err(compress)?
    } else {
        encoded
    };
    let prefix = grpc_prefix(gzip, payload.len(), &response.type_url)?;
    Ok(vec![Bytes::copy_from_slice(&prefix), Bytes::from(payload)])
}

/// A whole-set response: this stream's own fields (`own`, an encoded `DeltaDiscoveryResponse`
/// with no resources) followed by the shared set, plain or as one gzip member (the own fields in
/// stored, non-final deflate blocks, then the shared deflate blocks, which end with the final
/// one, then the CRC-32 and length of both parts).
fn frame_set(
    own: &[u8],
    set: &EncodedSet,
    gzip: bool,
    type_url: &str,
) -> Result<Frame, FrameError> {
    if !gzip {
        let mut head = Vec::with_capacity(5 + own.len());
        head.extend_from_slice(&grpc_prefix(false, own.len() + set.plain.len(), type_url)?);
        head.extend_from_slice(own);
        return Ok(vec![Bytes::from(head), set.plain.clone()]);
    }
    let mut head = Vec::with_capacity(5 + GZIP_HEADER.len() + own.len() + 16);
    head.extend_from_slice(&[0; 5]);
    head.extend_from_slice(&GZIP_HEADER);
    for block in own.chunks(usize::from(u16::MAX)) {
        // BFINAL 0, BTYPE 00 (stored), padded to the byte; then LEN and its complement.
        let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
        head.push(0);
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&(!len).to_le_bytes());
        head.extend_from_slice(block);
    }
    let mut crc = flate2::Crc::new();
    crc.update(own);
    crc.combine(&set.crc);
    let total = own.len() + set.plain.len();
    let mut tail = [0u8; 8];
    tail[..4].copy_from_slice(&crc.sum().to_le_bytes());
    // ISIZE is the length modulo 2^32.
    tail[4..].copy_from_slice(&((total & 0xffff_ffff) as u32).to_le_bytes());
    let payload = head.len() - 5 + set.deflated.len() + tail.len();
    head[..5].copy_from_slice(&grpc_prefix(true, payload, type_url)?);
    Ok(vec![
        Bytes::from(head),
        set.deflated.clone(),
        Bytes::copy_from_slice(&tail),
    ])
}

/// What a client holds of one type (as far as we know).
enum Holds {
    /// Exactly one snapshot's resources of the type: after any push of a type every client sees,
    /// the client holds what the store held, so the stream keeps that map instead of a copy.
    Shared(Arc<BTreeMap<String, Entry>>),
    /// name → version: what a resuming client reported, and the waypoint types (a scope).
    Own(BTreeMap<String, String>),
}

impl Default for Holds {
    fn default() -> Self {
        Self::Own(BTreeMap::new())
    }
}

impl Holds {
    fn version(&self, name: &str) -> Option<&str> {
        match self {
            Self::Shared(entries) => entries.get(name).map(|e| e.version.as_str()),
            Self::Own(versions) => versions.get(name).map(String::as_str),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.version(name).is_some()
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Shared(entries) => entries.is_empty(),
            Self::Own(versions) => versions.is_empty(),
        }
    }

    fn names(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        match self {
            Self::Shared(entries) => Box::new(entries.keys()),
            Self::Own(versions) => Box::new(versions.keys()),
        }
    }

    /// The map to edit (a shared one is copied first; only waypoint types are edited).
    fn own(&mut self) -> &mut BTreeMap<String, String> {
        if let Self::Shared(entries) = self {
            *self = Self::Own(
                entries
                    .iter()
                    .map(|(n, e)| (n.clone(), e.version.clone()))
                    .collect(),
            );
        }
        match self {
            Self::Own(versions) => versions,
            Self::Shared(_) => unreachable!("replaced above"),
        }
    }
}

#[derive(Default)]
struct ClientType {
    holds: Holds,
    answered: bool,
    /// The store generation this client was last brought up to.
    generation: u64,
}

struct Session {
    store: Store,
    metrics: Registry,
    client: String,
    /// The waypoint's Gateway (`<namespace>/<name>`), from the first Node that names one.
    gateway: Option<String>,
    types: BTreeMap<&'static str, ClientType>,
    nonce: u64,
    sink: Sink,
}

impl Session {
    fn count(&self, type_url: &'static str, resources: usize, since: Option<Instant>) {
        let label = [("url", type_url.to_string())];
        self.metrics
            .counter("ambit_xds_pushes_total", &label)
            .increment(1);
        self.metrics
            .counter("ambit_xds_pushed_resources_total", &label)
            .increment(resources as u64);
        if let Some(since) = since {
            self.metrics
                .histogram("ambit_xds_push_latency_seconds", &())
                .record(since.elapsed().as_secs_f64());
        }
    }

    /// Sends a response computed for this stream; false when the stream is gone.
    async fn send(&self, response: DeltaDiscoveryResponse) -> bool {
        match &self.sink {
            Sink::Messages(tx) => tx.send(Ok(response)).await.is_ok(),
            Sink::Frames { tx, gzip } => match frame_message(&response, *gzip) {
                Ok(frame) => tx.send(Ok(frame)).await.is_ok(),
                Err(error) => {
                    tracing::error!(client = %self.client, %error, "xDS response not sent; closing the stream");
                    let _ = tx.send(Err(Status::internal(error.to_string()))).await;
                    false
                }
            },
        }
    }

    /// Sends every resource of `type_url` (a type every client sees) to a client holding none,
    /// from the generation's shared encoding.
    async fn push_set(
        &mut self,
        type_url: &'static str,
        snapshot: &Arc<Snapshot>,
        current: Arc<BTreeMap<String, Entry>>,
    ) -> bool {
        let Sink::Frames { tx, gzip } = &self.sink else {
            return false;
        };
        let (tx, gzip) = (tx.clone(), *gzip);
        let framed = match snapshot.encoded(type_url).await {
            Ok(set) => {
                self.nonce += 1;
                let own = DeltaDiscoveryResponse {
                    type_url: type_url.to_string(),
                    nonce: self.nonce.to_string(),
                    ..Default::default()
                }
                .encode_to_vec();
                frame_set(&own, &set, gzip, type_url)
                    .map(|frame| (frame, set.resources))
                    .map_err(|e| e.to_string())
            }
            Err(error) => Err(error.to_string()),
        };
        let (frame, resources) = match framed {
            Ok(framed) => framed,
            Err(error) => {
                tracing::error!(client = %self.client, type_url, %error, "xDS response not sent; closing the stream");
                let _ = tx.send(Err(Status::internal(error))).await;
                return false;
            }
        };
        let state = self.types.entry(type_url).or_default();
        state.holds = Holds::Shared(current);
        state.answered = true;
        state.generation = snapshot.generation;
        self.count(type_url, resources, None);
        tracing::debug!(client = %self.client, type_url, resources, "push (shared encoding)");
        tx.send(Ok(frame)).await.is_ok()
    }

    /// Sends what `type_url`'s client lacks; `always` answers even with nothing to send.
    async fn push(&mut self, type_url: &'static str, always: bool, since: Option<Instant>) -> bool {
        let snapshot = self.store.snapshot();
        let current = snapshot.types.get(type_url).cloned().unwrap_or_default();
        // Waypoint types: only the client's own scope is visible, and it may change without any
        // resource changing, so the (small) scope and what is held are compared every time.
        let visible = snapshot.visible(type_url, self.gateway.as_deref());
        let state = self.types.entry(type_url).or_default();
        if visible.is_none()
            && !state.answered
            && state.holds.is_empty()
            && !current.is_empty()
            && matches!(self.sink, Sink::Frames { .. })
        {
            return self.push_set(type_url, &snapshot, current).await;
        }
        // A stream one generation behind only needs to look at what that generation changed;
        // otherwise (first answer, missed generations) it compares everything.
        let incremental = state.answered && state.generation + 1 == snapshot.generation;
        let candidates: Box<dyn Iterator<Item = &String>> = match visible {
            Some(scope) => Box::new(
                scope
                    .iter()
                    .chain(state.holds.names().filter(|n| !scope.contains(*n))),
            ),
            None if incremental => Box::new(snapshot.changed.get(type_url).into_iter().flatten()),
            None => Box::new(
                current
                    .keys()
                    .chain(state.holds.names().filter(|n| !current.contains_key(*n))),
            ),
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in candidates {
            let entry = match visible {
                Some(scope) if !scope.contains(name) => None,
                _ => current.get(name),
            };
            match entry {
                Some(entry) if state.holds.version(name) != Some(entry.version.as_str()) => {
                    resources.push(Resource {
                        name: name.clone(),
                        version: entry.version.clone(),
                        resource: Some(entry.any.clone()),
                        ..Default::default()
                    });
                }
                Some(_) => {}
                None if state.holds.contains(name) => removed.push(name.clone()),
                None => {}
            }
        }
        state.generation = snapshot.generation;
        let must_answer = always && !state.answered;
        if resources.is_empty() && removed.is_empty() && !must_answer {
            if visible.is_none() {
                state.holds = Holds::Shared(current);
            }
            return true;
        }
        if visible.is_none() {
            // Everything that differed is sent or removed: the client now holds `current`.
            state.holds = Holds::Shared(current);
        } else {
            let holds = state.holds.own();
            for r in &resources {
                holds.insert(r.name.clone(), r.version.clone());
            }
            for name in &removed {
                holds.remove(name);
            }
        }
        state.answered = true;
        self.nonce += 1;
        self.count(type_url, resources.len(), since);
        tracing::debug!(client = %self.client, type_url, resources = resources.len(), removed = removed.len(), "push");
        let response = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            resources,
            removed_resources: removed,
            ..Default::default()
        };
        self.send(response).await
    }

    async fn handle(&mut self, request: DeltaDiscoveryRequest) -> bool {
        if let Some(node) = &request.node {
            if !node.id.is_empty() {
                self.client = node.id.clone();
            }
            if self.gateway.is_none() {
                self.gateway = node_gateway(node);
                if let Some(gateway) = &self.gateway {
                    tracing::info!(client = %self.client, %gateway, "waypoint connected");
                }
            }
        }
        let Some(type_url) = known_type(&request.type_url) else {
            tracing::warn!(client = %self.client, type_url = %request.type_url, "subscription to an unknown type ignored");
            return true;
        };
        if !request.response_nonce.is_empty() {
            if let Some(error) = &request.error_detail {
                tracing::warn!(client = %self.client, type_url, nonce = %request.response_nonce, reason = %error.message, "NACK: the client keeps its last good state");
                self.metrics
                    .counter("ambit_xds_nacks_total", &[("url", type_url.to_string())])
                    .increment(1);
            }
            return true;
        }
        if request.resource_names_subscribe.iter().any(|n| n != "*") {
            tracing::warn!(client = %self.client, type_url, "on-demand subscriptions are not supported; serving everything");
        }
        let state = self.types.entry(type_url).or_default();
        if !state.answered {
            state.holds = Holds::Own(request.initial_resource_versions.into_iter().collect());
        }
        self.push(type_url, true, None).await
    }
}

impl XdsServer {
    /// Authenticates a new stream and starts its session, writing to `sink`.
    async fn open(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        requests: Streaming<DeltaDiscoveryRequest>,
        sink: Sink,
    ) -> Result<(), Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("istiod-lite is shutting down"));
        }
        let caller = self.auth.authenticate(metadata).await.map_err(|r| {
            tracing::warn!(reason = r.reason, message = %r.status.message(), "xDS client refused");
            r.status
        })?;
        let session = Session {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            client: match &caller.node {
                Some(node) => format!("node {node} ({})", caller.account()),
                None => caller.account(),
            },
            gateway: None,
            types: BTreeMap::new(),
            nonce: 0,
            sink,
        };
        tokio::spawn(run(
            session,
            requests,
            self.debounce,
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(())
    }

    /// A stream served by [`AdsService`]: the response's frames come from the session.
    async fn open_framed<B>(
        &self,
        request: http::Request<B>,
        max_decoding_message_size: usize,
    ) -> Result<http::Response<tonic::body::Body>, Status>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    {
        let (parts, body) = request.into_parts();
        let encoding = request_encoding(&parts.headers)?;
        let gzip = accepts_gzip(&parts.headers);
        let requests = Streaming::new_request(
            tonic_prost::ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default()
                .decoder(),
            body,
            encoding,
            Some(max_decoding_message_size),
        );
        let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
        let (tx, rx) = mpsc::channel(16);
        self.open(&metadata, requests, Sink::Frames { tx, gzip })
            .await?;
        let mut response = http::Response::new(tonic::body::Body::new(FramesBody {
            rx,
            parts: VecDeque::new(),
            ended: false,
        }));
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            tonic::metadata::GRPC_CONTENT_TYPE,
        );
        headers.insert(
            "grpc-accept-encoding",
            http::HeaderValue::from_static("gzip"),
        );
        if gzip {
            headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        }
        Ok(response)
    }
}

/// A session's loop: requests from the client, store changes (debounced), shutdown.
async fn run(
    mut session: Session,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    debounce: Duration,
    metrics: Registry,
    shutdown: CancellationToken,
) {
    let connected = metrics.gauge("ambit_xds_connected_proxies", &());
    connected.increment(1.0);
    let mut changes = session.store.subscribe();
    changes.borrow_and_update();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                tracing::debug!(client = %session.client, "xDS stream closed: shutting down");
                break;
            }
            message = requests.message() => match message {
                Ok(Some(request)) => {
                    if !session.handle(request).await {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(client = %session.client, %status, "xDS stream ended");
                    break;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let since = Instant::now();
                tokio::time::sleep(debounce).await;
                changes.borrow_and_update();
                let subscribed: Vec<&'static str> = session.types.keys().copied().collect();
                let mut open = true;
                for type_url in subscribed {
                    open &= session.push(type_url, false, Some(since)).await;
                }
                if !open {
                    break;
                }
            }
        }
    }
    connected.decrement(1.0);
    tracing::info!(client = %session.client, "xDS client disconnected");
}

/// The response body of a framed stream: the session's frames, then the status in trailers
/// (OK when the session ends the stream, its error otherwise).
struct FramesBody {
    rx: mpsc::Receiver<Result<Frame, Status>>,
    parts: VecDeque<Bytes>,
    ended: bool,
}

impl http_body::Body for FramesBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(part) = this.parts.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(part))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let status = match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Ok(frame)) => {
                    this.parts.extend(frame);
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            this.ended = true;
            let mut trailers = http::HeaderMap::new();
            return Poll::Ready(Some(
                status
                    .add_header(&mut trailers)
                    .map(|()| http_body::Frame::trailers(trailers)),
            ));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.parts.is_empty()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let metadata = request.metadata().clone();
        self.open(&metadata, request.into_inner(), Sink::Messages(tx))
            .await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn entries(count: usize, size: usize) -> BTreeMap<String, Entry> {
        (0..count)
            .map(|i| {
                let value: Vec<u8> = (0..size).map(|b| ((b * 31 + i * 7) % 251) as u8).collect();
                (
                    format!("demo/pod-{i}"),
                    Entry {
                        version: format!("{i:016x}"),
                        any: prost_types::Any {
                            type_url: ADDRESS_TYPE_URL.into(),
                            value,
                        },
                    },
                )
            })
            .collect()
    }

    /// The frame's compressed flag and payload, checking the length prefix.
    fn unframe(frame: &Frame) -> (u8, Vec<u8>) {
        let bytes: Vec<u8> = frame.iter().flat_map(|part| part.iter().copied()).collect();
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - 5, "length prefix");
        (bytes[0], bytes[5..].to_vec())
    }

    fn expected(own: &DeltaDiscoveryResponse, entries: &BTreeMap<String, Entry>) -> Vec<Resource> {
        assert!(own.resources.is_empty());
        entries
            .iter()
            .map(|(name, e)| Resource {
                name: name.clone(),
                version: e.version.clone(),
                resource: Some(e.any.clone()),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_shared_set_framed_for_a_stream_decodes_as_one_message_with_its_own_fields() {
        let entries = entries(500, 300);
        let set = EncodedSet::encode(&entries).unwrap();
        assert_eq!(set.resources, 500);
        assert!(set.deflated.len() < set.plain.len());
        // Own fields over one stored block's 65,535 bytes take several.
        for version_info in ["", &"v".repeat(140_000)] {
            let own = DeltaDiscoveryResponse {
                type_url: ADDRESS_TYPE_URL.into(),
                nonce: "17".into(),
                system_version_info: version_info.to_string(),
                ..Default::default()
            };
            let want = DeltaDiscoveryResponse {
                resources: expected(&own, &entries),
                ..own.clone()
            };
            let encoded = own.encode_to_vec();

            let plain = frame_set(&encoded, &set, false, ADDRESS_TYPE_URL).unwrap();
            let (flag, payload) = unframe(&plain);
            assert_eq!(flag, 0);
            assert_eq!(DeltaDiscoveryResponse::decode(&payload[..]).unwrap(), want);

            let gzip = frame_set(&encoded, &set, true, ADDRESS_TYPE_URL).unwrap();
            let (flag, payload) = unframe(&gzip);
            assert_eq!(flag, 1);
            // One gzip member, checked by the decoder against its CRC and length.
            let mut inflated = Vec::new();
            flate2::read::GzDecoder::new(&payload[..])
                .read_to_end(&mut inflated)
                .unwrap();
            assert_eq!(DeltaDiscoveryResponse::decode(&inflated[..]).unwrap(), want);
            assert_eq!(
                gzip[1].as_ptr(),
                set.deflated.as_ptr(),
                "the shared bytes are not copied"
            );
        }
    }

    #[test]
    fn a_message_framed_for_one_stream_is_gzipped_only_when_accepted() {
        let response = DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            nonce: "3".into(),
            removed_resources: vec!["demo/gone".into()],
            ..Default::default()
        };
        let (flag, payload) = unframe(&frame_message(&response, false).unwrap());
        assert_eq!(flag, 0);
        assert_eq!(
            DeltaDiscoveryResponse::decode(&payload[..]).unwrap(),
            response
        );
        let (flag, payload) = unframe(&frame_message(&response, true).unwrap());
        assert_eq!(flag, 1);
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&payload[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(
            DeltaDiscoveryResponse::decode(&inflated[..]).unwrap(),
            response
        );
    }

    #[test]
    fn gzip_is_used_only_when_the_client_names_it() {
        let mut headers = http::HeaderMap::new();
        assert!(!accepts_gzip(&headers));
        headers.insert("grpc-accept-encoding", "identity, deflate".parse().unwrap());
        assert!(!accepts_gzip(&headers));
        headers.insert("grpc-accept-encoding", "deflate,gzip".parse().unwrap());
        assert!(accepts_gzip(&headers));
        assert_eq!(request_encoding(&headers).unwrap(), None);
        headers.insert("grpc-encoding", "gzip".parse().unwrap());
        assert_eq!(
            request_encoding(&headers).unwrap(),
            Some(CompressionEncoding::Gzip)
        );
        headers.insert("grpc-encoding", "zstd".parse().unwrap());
        let refused = request_encoding(&headers).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("zstd"), "{}", refused.message());
    }
}
