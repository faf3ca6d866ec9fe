//! The delta xDS client: subscribes to `istio.workload.Address` and `istio.security.Authorization`
//! on one `DeltaAggregatedResources` stream, applies what arrives to [`MeshState`], ACKs or NACKs
//! every response, and on reconnect tells the server which versions it already holds so that an
//! unchanged control plane pushes nothing.

use std::collections::HashMap;
use std::time::Duration;

use ambit_core::drain::DrainWatcher;
use ambit_core::metrics::Registry;
use ambit_core::readiness::BlockReady;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::envoy_core::Node;
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, google_rpc, unpack_any};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::control::{Backoff, ControlError, ControlPlane, error_chain};
use crate::mesh::{MeshState, Rejection};

/// The largest response accepted (upstream: 200 MiB).
const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;

/// The types ztunnel subscribes to, in the order it subscribes.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// xDS client settings.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// Where and how to connect.
    pub control_plane: ControlPlane,
    /// How this proxy identifies itself.
    pub node: Node,
    /// First reconnect delay (upstream: 10 ms).
    pub backoff_initial: Duration,
    /// Largest reconnect delay (upstream: 15 s).
    pub backoff_max: Duration,
}

/// Why a session ended.
#[derive(Debug, Error)]
pub enum XdsError {
    /// Could not connect or authenticate.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The server ended the stream with an error status.
    #[error("xDS stream to {address} failed: {status}")]
    Stream {
        /// The control plane.
        address: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
}

impl XdsError {
    /// gRPC codes upstream treats as routine (reconnect at once, no backoff).
    fn is_benign(&self) -> bool {
        match self {
            XdsError::Control(_) => false,
            XdsError::Stream { status, .. } => matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ),
        }
    }

    fn metric_reason(&self) -> &'static str {
        match self {
            XdsError::Control(_) => "ConnectionError",
            XdsError::Stream { .. } if self.is_benign() => "Reconnect",
            XdsError::Stream { .. } => "Error",
        }
    }
}

/// Per-type bookkeeping that survives reconnects.
#[derive(Default)]
struct TypeState {
    /// Accepted resources and their versions, sent back as `initial_resource_versions`.
    held: HashMap<String, String>,
    /// At least one response of this type was processed (readiness).
    seen: bool,
}

/// The xDS client. Run it with [`XdsClient::run`].
pub struct XdsClient {
    config: XdsConfig,
    state: MeshState,
    metrics: Registry,
    types: HashMap<&'static str, TypeState>,
    ready: Option<BlockReady>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("address", &self.config.control_plane.address)
            .finish_non_exhaustive()
    }
}

/// Registers the xDS metrics' help texts.
pub fn describe_metrics(metrics: &Registry) {
    metrics.describe_counter(
        "istio_xds_connection_terminations_total",
        "xDS streams that ended, by reason (ConnectionError, Error, Reconnect, Complete)",
    );
    metrics.describe_counter(
        "istio_xds_message_total",
        "xDS responses received, by type URL",
    );
    metrics.describe_counter(
        "istio_xds_message_bytes_total",
        "Bytes of xDS resources received, by type URL",
    );
    metrics.describe_counter(
        "ambit_xds_rejected_resources_total",
        "Resources NACKed because they failed validation, by type URL",
    );
}

impl XdsClient {
    /// A client feeding `state`. `ready` is released once both types have been received.
    pub fn new(
        config: XdsConfig,
        state: MeshState,
        metrics: Registry,
        ready: Option<BlockReady>,
    ) -> Self {
        describe_metrics(&metrics);
        let types = TYPES.iter().map(|t| (*t, TypeState::default())).collect();
        Self {
            config,
            state,
            metrics,
            types,
            ready,
        }
    }

    /// Keeps a session open until `drain` fires, reconnecting with backoff.
    pub async fn run(mut self, drain: DrainWatcher) {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let outcome = tokio::select! {
                outcome = self.session(&mut backoff) => outcome,
                _ = drain.signaled() => return,
            };
            let delay = match outcome {
                Ok(()) => {
                    self.count_termination("Complete");
                    tracing::info!(address = %self.config.control_plane.address, "xDS stream closed by the server, reconnecting");
                    Duration::ZERO
                }
                Err(e) => {
                    self.count_termination(e.metric_reason());
                    let delay = if e.is_benign() {
                        Duration::ZERO
                    } else {
                        backoff.next_delay()
                    };
                    tracing::warn!(error = %e, retry_in = ?delay, "xDS stream ended");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = drain.signaled() => return,
            }
        }
    }

    fn count_termination(&self, reason: &'static str) {
        self.metrics
            .counter(
                "istio_xds_connection_terminations_total",
                &[("reason", reason.to_string())],
            )
            .increment(1);
    }

    /// One stream: subscribe, then apply and answer responses until the stream ends.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), XdsError> {
        let address = self.config.control_plane.address.clone();
        let channel = self.config.control_plane.connect().await?;
        let metadata = self.config.control_plane.metadata()?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
        for type_url in TYPES {
            // The channel has room for both initial requests.
            let _ = tx.try_send(self.initial_request(type_url));
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        *request.metadata_mut() = metadata;
        // Accepting gzip lets a control plane that offers it (ours does) send a fraction of the
        // bytes; one that does not is unaffected.
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream_error = |status: tonic::Status| XdsError::Stream {
            address: address.clone(),
            status: Box::new(status),
        };
        let mut responses = client
            .delta_aggregated_resources(request)
            .await
            .map_err(stream_error)?
            .into_inner();
        tracing::info!(address = %address, "xDS stream established");
        loop {
            let Some(response) = responses.message().await.map_err(stream_error)? else {
                return Ok(());
            };
            backoff.reset();
            let answer = self.handle(response);
            if tx.send(answer).await.is_err() {
                // The request side is gone: the stream is over; the next message() reports why.
                continue;
            }
        }
    }

    fn initial_request(&self, type_url: &'static str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.config.node.clone()),
            type_url: type_url.to_string(),
            initial_resource_versions: self.types[type_url].held.clone(),
            ..Default::default()
        }
    }

    /// Applies one response and builds its ACK or NACK.
    fn handle(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let type_url = response.type_url.clone();
        let url_label = [("url", type_url.clone())];
        self.metrics
            .counter("istio_xds_message_total", &url_label)
            .increment(1);
        let bytes: usize = response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|a| a.value.len())
            .sum();
        self.metrics
            .counter("istio_xds_message_bytes_total", &url_label)
            .increment(bytes as u64);

        let rejected = match self.types.get_key_value(type_url.as_str()) {
            Some((&known, _)) => self.apply(known, &response),
            None => vec![Rejection {
                name: type_url.clone(),
                reason: "type not subscribed by ztunnel".to_string(),
            }],
        };
        if !rejected.is_empty() {
            self.metrics
                .counter("ambit_xds_rejected_resources_total", &url_label)
                .increment(rejected.len() as u64);
        }
        self.mark_seen(&type_url);

        let error_detail = (!rejected.is_empty()).then(|| {
            let message = rejected
                .iter()
                .map(Rejection::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(type_url = %type_url, nonce = %response.nonce, %message, "NACK: resources rejected, keeping the last good versions");
            google_rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        }
    }

    fn apply(
        &mut self,
        type_url: &'static str,
        response: &DeltaDiscoveryResponse,
    ) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let mut versions = Vec::new();
        let removals = &response.removed_resources;
        let rejected_after_apply = if type_url == ADDRESS_TYPE_URL {
            let upserts = decode_all(response, &mut rejected, &mut versions);
            self.state.apply_addresses(&upserts, removals)
        } else {
            let upserts = decode_all(response, &mut rejected, &mut versions);
            self.state.apply_policies(&upserts, removals)
        };
        rejected.extend(rejected_after_apply);
        let held = &mut self
            .types
            .get_mut(type_url)
            .expect("type_url came from the map's own keys")
            .held;
        for name in removals {
            held.remove(name);
        }
        for (name, version) in versions {
            if !rejected.iter().any(|r| r.name == name) {
                held.insert(name, version);
            }
        }
        rejected
    }

    fn mark_seen(&mut self, type_url: &str) {
        if let Some(t) = self.types.get_mut(type_url) {
            t.seen = true;
        }
        if self.types.values().all(|t| t.seen)
            && let Some(ready) = self.ready.take()
        {
            tracing::info!("xDS: initial configuration received for every type");
            ready.ready();
        }
    }
}

/// Decodes every resource of a response into `M`, recording names and versions; undecodable
/// ones become rejections.
fn decode_all<M: prost::Name + Default>(
    response: &DeltaDiscoveryResponse,
    rejected: &mut Vec<Rejection>,
    versions: &mut Vec<(String, String)>,
) -> Vec<(String, M)> {
    let mut out = Vec::with_capacity(response.resources.len());
    for resource in &response.resources {
        let decoded = match &resource.resource {
            Some(any) => unpack_any::<M>(any).map_err(|e| error_chain(&e)),
            None => Err("resource has no payload".to_string()),
        };
        match decoded {
            Ok(message) => {
                versions.push((resource.name.clone(), resource.version.clone()));
                out.push((resource.name.clone(), message));
            }
            Err(reason) => rejected.push(Rejection {
                name: resource.name.clone(),
                reason,
            }),
        }
    }
    out
}
