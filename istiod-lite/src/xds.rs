//! The delta xDS server for `istio.workload.Address` and `istio.security.Authorization` (every
//! client) and `ambit.waypoint.v1.Route` and `ambit.waypoint.v1.Policy` (each waypoint only its
//! own, named by its Gateway in the Node metadata `GATEWAY_NAME`/`GATEWAY_NAMESPACE`). Each
//! stream tracks what its client holds: it starts from the versions the client reports, sends
//! only what differs (always answering a new subscription, even with nothing, because a client
//! waits for a response per type before it is ready), and after every debounced change sends
//! exactly the resources that changed and the names that disappeared, or left its scope.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ambit_core::metrics::Registry;
use ambit_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_POLICY_TYPE_URL, ROUTE_TYPE_URL};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Authenticator;
use crate::store::Store;

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
/// (tonic only compresses when the client's `grpc-accept-encoding` names gzip, so upstream
/// ztunnel, which does not, gets plain messages), requests may be compressed, and large
/// requests (a reconnect listing every held resource) are accepted.
pub fn service(server: XdsServer) -> AggregatedDiscoveryServiceServer<XdsServer> {
    AggregatedDiscoveryServiceServer::new(server)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(16 << 20)
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

#[derive(Default)]
struct ClientType {
    /// name → version the client holds (as far as we know).
    holds: BTreeMap<String, String>,
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
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Session {
    /// Sends what `type_url`'s client lacks; `always` answers even with nothing to send.
    async fn push(&mut self, type_url: &'static str, always: bool, since: Option<Instant>) -> bool {
        let snapshot = self.store.snapshot();
        let empty = BTreeMap::new();
        let current = snapshot.types.get(type_url).unwrap_or(&empty);
        let state = self.types.entry(type_url).or_default();
        // Waypoint types: only the client's own scope is visible, and it may change without any
        // resource changing, so the (small) scope and what is held are compared every time.
        let visible = snapshot.visible(type_url, self.gateway.as_deref());
        // A stream one generation behind only needs to look at what that generation changed;
        // otherwise (first answer, missed generations) it compares everything.
        let incremental = state.answered && state.generation + 1 == snapshot.generation;
        let candidates: Box<dyn Iterator<Item = &String>> = match visible {
            Some(scope) => Box::new(
                scope
                    .iter()
                    .chain(state.holds.keys().filter(|n| !scope.contains(*n))),
            ),
            None if incremental => Box::new(snapshot.changed.get(type_url).into_iter().flatten()),
            None => Box::new(
                current
                    .keys()
                    .chain(state.holds.keys().filter(|n| !current.contains_key(*n))),
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
                Some(entry) if state.holds.get(name) != Some(&entry.version) => {
                    resources.push(Resource {
                        name: name.clone(),
                        version: entry.version.clone(),
                        resource: Some(entry.any.clone()),
                        ..Default::default()
                    });
                }
                Some(_) => {}
                None if state.holds.contains_key(name) => removed.push(name.clone()),
                None => {}
            }
        }
        let removed: Vec<String> = removed;
        state.generation = snapshot.generation;
        let must_answer = always && !state.answered;
        if resources.is_empty() && removed.is_empty() && !must_answer {
            return true;
        }
        for r in &resources {
            state.holds.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            state.holds.remove(name);
        }
        state.answered = true;
        self.nonce += 1;
        let label = [("url", type_url.to_string())];
        self.metrics
            .counter("ambit_xds_pushes_total", &label)
            .increment(1);
        self.metrics
            .counter("ambit_xds_pushed_resources_total", &label)
            .increment(resources.len() as u64);
        if let Some(since) = since {
            self.metrics
                .histogram("ambit_xds_push_latency_seconds", &())
                .record(since.elapsed().as_secs_f64());
        }
        tracing::debug!(client = %self.client, type_url, resources = resources.len(), removed = removed.len(), "push");
        let response = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            resources,
            removed_resources: removed,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.is_ok()
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
            state.holds = request.initial_resource_versions.into_iter().collect();
        }
        self.push(type_url, true, None).await
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("istiod-lite is shutting down"));
        }
        let caller = self
            .auth
            .authenticate(request.metadata())
            .await
            .map_err(|r| {
                tracing::warn!(reason = r.reason, message = %r.status.message(), "xDS client refused");
                r.status
            })?;
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut session = Session {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            client: match &caller.node {
                Some(node) => format!("node {node} ({})", caller.account()),
                None => caller.account(),
            },
            gateway: None,
            types: BTreeMap::new(),
            nonce: 0,
            tx,
        };
        let debounce = self.debounce;
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
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
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
