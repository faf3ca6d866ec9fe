//! A fake ADS server for the xDS client tests (here and in ztunnel's): every stream a client
//! opens is handed to the test as a [`Session`] that reads the client's requests and pushes
//! responses.
#![allow(dead_code)]

use std::pin::Pin;
use std::time::Duration;

use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// One stream as the fake control plane sees it.
pub(crate) struct Session {
    pub(crate) requests: Streaming<DeltaDiscoveryRequest>,
    pub(crate) responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    pub(crate) metadata: tonic::metadata::MetadataMap,
}

impl Session {
    pub(crate) async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        timeout(WAIT, self.requests.message())
            .await
            .expect("client sent nothing within 10s")
            .expect("stream error")
            .expect("client closed the stream")
    }

    /// Sends a response and returns the client's answer to it.
    pub(crate) async fn push(
        &mut self,
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryRequest {
        self.responses
            .send(Ok(DeltaDiscoveryResponse {
                type_url: type_url.to_string(),
                nonce: nonce.to_string(),
                resources,
                removed_resources: removed.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
            .await
            .expect("client gone");
        let answer = self.next_request().await;
        assert_eq!(answer.type_url, type_url);
        assert_eq!(answer.response_nonce, nonce);
        answer
    }
}

pub(crate) struct FakeAds {
    pub(crate) sessions: mpsc::Sender<Session>,
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let metadata = request.metadata().clone();
        let (tx, rx) = mpsc::channel(16);
        self.sessions
            .send(Session {
                requests: request.into_inner(),
                responses: tx,
                metadata,
            })
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
