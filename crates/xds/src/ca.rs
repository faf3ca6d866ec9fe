//! The Istio CA client: `IstioCertificateService/CreateCertificate` over TLS, asking for each pod's
//! identity with the `ImpersonatedIdentity` metadata a node agent uses (ztunnel), or for the
//! caller's own identity (a waypoint). Plugged into the identity
//! crate's [`CertStore`](ambit_identity::store::CertStore), which owns refresh, backoff and
//! concurrency.

use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_identity::Identity;
use ambit_identity::store::{CertState, CertStore};
use ambit_identity::store::{CertificateSource, FetchError, FetchFuture};
use ambit_proto::ca::IstioCertificateRequest;
use ambit_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::control::ControlPlane;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Requests certificates for workloads on this node from the CA.
#[derive(Debug)]
pub struct CaClient {
    control: ControlPlane,
    /// Reused while healthy; rebuilt after a transport failure (also picks up a rotated root).
    channel: Mutex<Option<Channel>>,
    /// Ask for identities other than our own (in-pod mode). Off only for a dedicated proxy.
    impersonate: bool,
}

impl CaClient {
    /// A client for `control`; `impersonate` adds the `ImpersonatedIdentity` metadata.
    pub fn new(control: ControlPlane, impersonate: bool) -> Self {
        Self {
            control,
            channel: Mutex::new(None),
            impersonate,
        }
    }

    async fn channel(&self) -> Result<Channel, FetchError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref() {
            return Ok(channel.clone());
        }
        let channel = self
            .control
            .connect()
            .await
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn create(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> Result<Vec<String>, FetchError> {
        let metadata = self.impersonate.then(|| Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        *request.metadata_mut() = self
            .control
            .metadata()
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        let channel = self.channel().await?;
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await;
        match response {
            Ok(response) => {
                let chain = response.into_inner().cert_chain;
                if chain.len() < 2 {
                    return Err(FetchError::Refused(format!(
                        "the CA returned {} certificate(s) for {identity}; a leaf and the root \
                         are required",
                        chain.len()
                    )));
                }
                Ok(chain)
            }
            Err(status) => {
                let refused = matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                );
                let text = format!("{} for {identity} ({:?})", status.message(), status.code());
                if refused {
                    Err(FetchError::Refused(text))
                } else {
                    // Transport trouble: reconnect on the next attempt.
                    *self.channel.lock().await = None;
                    Err(FetchError::Unavailable(text))
                }
            }
        }
    }
}

impl CertificateSource for CaClient {
    fn fetch(&self, identity: &Identity, csr_pem: String) -> FetchFuture<'_> {
        self.fetch_with_ttl(identity, csr_pem, Duration::from_secs(24 * 3600))
    }

    fn fetch_with_ttl(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> FetchFuture<'_> {
        let identity = identity.clone();
        Box::pin(async move { self.create(&identity, csr_pem, ttl).await })
    }
}

/// Refreshes the certificate gauges just before a scrape: `ambit_certificates{state}` and
/// `ambit_certificate_expiry_seconds{identity}` (negative once expired).
pub fn certificate_gauges(registry: &Registry, certs: &CertStore) {
    registry.describe_gauge(
        "ambit_certificates",
        "Workload certificates managed by this proxy, by state",
    );
    registry.describe_gauge(
        "ambit_certificate_expiry_seconds",
        "Seconds until the certificate of each identity expires (negative: expired)",
    );
    let mut by_state: std::collections::BTreeMap<&'static str, f64> = [
        ("initializing", 0.0),
        ("available", 0.0),
        ("refreshing", 0.0),
        ("failing", 0.0),
    ]
    .into_iter()
    .collect();
    let now = std::time::SystemTime::now();
    for status in certs.snapshot() {
        let state = match status.state {
            CertState::Initializing => "initializing",
            CertState::Available => "available",
            CertState::Refreshing => "refreshing",
            CertState::Failing { .. } => "failing",
        };
        *by_state.entry(state).or_default() += 1.0;
        if let Some(not_after) = status.not_after {
            let remaining = match not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            registry
                .gauge(
                    "ambit_certificate_expiry_seconds",
                    &[("identity", status.identity.to_string())],
                )
                .set(remaining);
        }
    }
    for (state, count) in by_state {
        registry
            .gauge("ambit_certificates", &[("state", state.to_string())])
            .set(count);
    }
}
