//! The delta xDS client: subscribes to the types its caller registered on one
//! `DeltaAggregatedResources` stream, hands what arrives to each type's handler, ACKs or NACKs
//! every response, and on reconnect tells the server which versions it already holds so that an
//! unchanged control plane pushes nothing.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::time::Duration;

use ambit_core::drain::DrainWatcher;
use ambit_core::metrics::Registry;
use ambit_core::readiness::BlockReady;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::envoy_core::Node;
use ambit_proto::{google_rpc, unpack_any};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Rejection;
use crate::control::{Backoff, ControlError, ControlPlane, error_chain};

/// The largest response accepted (upstream: 200 MiB).
const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;

/// xDS client settings.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// Where and how to connect.
    pub control_plane: ControlPlane,
    /// How this proxy identifies itself (`ztunnel~...`, `waypoint~...`, with its metadata).
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

/// What one subscribed type's resources are handed to.
///
/// Called on the client's task for every response of the type, with the resources that decoded
/// (by resource name) and the names removed. Returns the resources it refused; those are NACKed
/// with their reasons and not reported as held on reconnect, while the rest count as applied.
/// Keep it short: it must not block (take a lock, update, release).
///
/// Any `FnMut(&[(String, M)], &[String]) -> Vec<Rejection> + Send` closure is a handler.
pub trait Handler<M>: Send + 'static {
    /// Applies upserts and removals; returns what was refused.
    fn apply(&mut self, upserts: &[(String, M)], removals: &[String]) -> Vec<Rejection>;
}

impl<M, F> Handler<M> for F
where
    F: FnMut(&[(String, M)], &[String]) -> Vec<Rejection> + Send + 'static,
{
    fn apply(&mut self, upserts: &[(String, M)], removals: &[String]) -> Vec<Rejection> {
        self(upserts, removals)
    }
}

/// A handler with its message type erased, so that one client holds handlers of several types.
trait Subscription: Send {
    /// Decodes `response`, applies it, and returns what was refused plus the versions of what
    /// decoded (the caller keeps those not refused).
    fn apply(
        &mut self,
        response: &DeltaDiscoveryResponse,
    ) -> (Vec<Rejection>, Vec<(String, String)>);
}

struct Typed<M, H> {
    handler: H,
    // `fn() -> M` keeps `Typed` Send whatever `M` is: no `M` is ever stored.
    message: PhantomData<fn() -> M>,
}

impl<M, H> Subscription for Typed<M, H>
where
    M: prost::Name + Default,
    H: Handler<M>,
{
    fn apply(
        &mut self,
        response: &DeltaDiscoveryResponse,
    ) -> (Vec<Rejection>, Vec<(String, String)>) {
        let mut rejected = Vec::new();
        let mut versions = Vec::with_capacity(response.resources.len());
        let mut upserts = Vec::with_capacity(response.resources.len());
        for resource in &response.resources {
            let decoded = match &resource.resource {
                Some(any) => unpack_any::<M>(any).map_err(|e| error_chain(&e)),
                None => Err("resource has no payload".to_string()),
            };
            match decoded {
                Ok(message) => {
                    versions.push((resource.name.clone(), resource.version.clone()));
                    upserts.push((resource.name.clone(), message));
                }
                Err(reason) => rejected.push(Rejection {
                    name: resource.name.clone(),
                    reason,
                }),
            }
        }
        rejected.extend(self.handler.apply(&upserts, &response.removed_resources));
        (rejected, versions)
    }
}

/// One subscribed type: its handler and the bookkeeping that survives reconnects.
struct TypeState {
    type_url: String,
    subscription: Box<dyn Subscription>,
    /// Accepted resources and their versions, sent back as `initial_resource_versions`.
    held: HashMap<String, String>,
    /// At least one response of this type was processed (readiness).
    seen: bool,
}

/// Collects the subscriptions of an [`XdsClient`]; from [`XdsClient::builder`].
pub struct XdsClientBuilder {
    config: XdsConfig,
    metrics: Registry,
    types: Vec<TypeState>,
    ready: Option<BlockReady>,
}

impl std::fmt::Debug for XdsClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClientBuilder")
            .field("address", &self.config.control_plane.address)
            .field("types", &type_urls(&self.types))
            .finish_non_exhaustive()
    }
}

impl XdsClientBuilder {
    /// Subscribes to every resource of `M`'s type (type URL `type.googleapis.com/<M's full
    /// name>`), handing decoded resources to `handler`. Types are requested in the order they are
    /// subscribed; subscribing to a type again replaces its handler and keeps its place.
    pub fn subscribe<M>(mut self, handler: impl Handler<M>) -> Self
    where
        M: prost::Name + Default + 'static,
    {
        let type_url = M::type_url();
        let subscription: Box<dyn Subscription> = Box::new(Typed {
            handler,
            message: PhantomData::<fn() -> M>,
        });
        match self.types.iter_mut().find(|t| t.type_url == type_url) {
            Some(existing) => existing.subscription = subscription,
            None => self.types.push(TypeState {
                type_url,
                subscription,
                held: HashMap::new(),
                seen: false,
            }),
        }
        self
    }

    /// Releases `ready` once a response of every subscribed type has been processed.
    pub fn ready(mut self, ready: Option<BlockReady>) -> Self {
        self.ready = ready;
        self
    }

    /// The client. Run it with [`XdsClient::run`].
    pub fn build(self) -> XdsClient {
        describe_metrics(&self.metrics);
        XdsClient {
            config: self.config,
            metrics: self.metrics,
            types: self.types,
            ready: self.ready,
        }
    }
}

/// The xDS client. Built with [`XdsClient::builder`], run with [`XdsClient::run`].
pub struct XdsClient {
    config: XdsConfig,
    metrics: Registry,
    types: Vec<TypeState>,
    ready: Option<BlockReady>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("address", &self.config.control_plane.address)
            .field("types", &type_urls(&self.types))
            .finish_non_exhaustive()
    }
}

fn type_urls(types: &[TypeState]) -> Vec<&str> {
    types.iter().map(|t| t.type_url.as_str()).collect()
}

/// Registers the xDS metrics' help texts.
pub fn describe_metrics(metrics: &Registry) {
    metrics.describe_counter(
        "istio_xds_connection_terminations_total",
        "xDS streams that ended, by reason (ConnectionError, Error, Reconnect, Complete)",
    );
    // Every reason's series exists from the start (at 0), so dashboards' rate() over it shows a
    // flat line rather than "no data" while the connection has never ended.
    for reason in ["ConnectionError", "Error", "Reconnect", "Complete"] {
        metrics
            .counter(
                "istio_xds_connection_terminations_total",
                &[("reason", reason.to_string())],
            )
            .increment(0);
    }
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
    /// A client that connects as `config` says and counts into `metrics`; add types with
    /// [`XdsClientBuilder::subscribe`].
    pub fn builder(config: XdsConfig, metrics: Registry) -> XdsClientBuilder {
        XdsClientBuilder {
            config,
            metrics,
            types: Vec::new(),
            ready: None,
        }
    }

    /// Keeps a session open until `drain` fires, reconnecting with backoff.
    pub async fn run(mut self, drain: DrainWatcher) {
        if self.types.is_empty() {
            // Nothing to wait for: nothing will ever arrive.
            tracing::warn!("xDS client has no subscriptions; not connecting");
            self.ready.take();
            return;
        }
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
        // Room for every initial request plus answers in flight.
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(self.types.len() + 8);
        for request in self.initial_requests() {
            // The channel was sized for every initial request.
            let _ = tx.try_send(request);
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

    /// One wildcard request per type, in subscription order, with the versions already held.
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .map(|t| DeltaDiscoveryRequest {
                node: Some(self.config.node.clone()),
                type_url: t.type_url.clone(),
                initial_resource_versions: t.held.clone(),
                ..Default::default()
            })
            .collect()
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

        let rejected = match self.types.iter_mut().find(|t| t.type_url == type_url) {
            Some(t) => {
                let (rejected, versions) = t.subscription.apply(&response);
                for name in &response.removed_resources {
                    t.held.remove(name);
                }
                for (name, version) in versions {
                    if !rejected.iter().any(|r| r.name == name) {
                        t.held.insert(name, version);
                    }
                }
                t.seen = true;
                rejected
            }
            None => vec![Rejection {
                name: type_url.clone(),
                reason: "type not subscribed by this client".to_string(),
            }],
        };
        if !rejected.is_empty() {
            self.metrics
                .counter("ambit_xds_rejected_resources_total", &url_label)
                .increment(rejected.len() as u64);
        }
        if self.types.iter().all(|t| t.seen)
            && let Some(ready) = self.ready.take()
        {
            tracing::info!("xDS: initial configuration received for every type");
            ready.ready();
        }

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
}
