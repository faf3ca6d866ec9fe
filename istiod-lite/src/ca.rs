//! The CA: a root kept in a directory (generated on first start, or provided by the operator),
//! and the Istio `CreateCertificate` API. A ztunnel may obtain a pod's identity only when a pod
//! with that service account runs on the ztunnel's own node; the CSR must name exactly that
//! identity; lifetimes are capped. Every refusal names the reason and is counted.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateService;
use ambit_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use crate::auth::TokenFileAuthenticator;
use crate::store::Store;

/// Loads the operator's CA (`ca-cert.pem`, `ca-key.pem`, optional `cert-chain.pem` with the
/// intermediates up to the root) or, on first start, generates a root and keeps it there with
/// owner-only permissions. Also writes `root-cert.pem`, the root workloads trust.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> anyhow::Result<CertificateAuthority> {
    let cert = dir.join("ca-cert.pem");
    let key = dir.join("ca-key.pem");
    let ca = if cert.exists() && key.exists() {
        let chain: Vec<String> = match std::fs::read_to_string(dir.join("cert-chain.pem")) {
            Ok(text) => pem_blocks(&text).into_iter().skip(1).collect(),
            Err(_) => Vec::new(),
        };
        CertificateAuthority::from_pem(
            &std::fs::read_to_string(&cert)?,
            &std::fs::read_to_string(&key)?,
            &chain,
        )
        .map_err(|e| anyhow::anyhow!("loading the CA from {}: {e}", dir.display()))?
    } else {
        std::fs::create_dir_all(dir)?;
        let ca = CertificateAuthority::generate_root(
            trust_domain,
            Duration::from_secs(10 * 365 * 86400),
        )?;
        write_private(&key, &ca.key_pem())?;
        write_private(&cert, &ca.cert_pem())?;
        tracing::info!(dir = %dir.display(), "generated a new root CA");
        ca
    };
    write_private(&dir.join("root-cert.pem"), &ca.root_pem())?;
    Ok(ca)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn pem_blocks(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| format!("{b}\n"))
        .collect()
}

/// The `IstioCertificateService` implementation.
#[derive(Clone)]
pub struct CaService {
    /// The signer.
    pub ca: Arc<CertificateAuthority>,
    /// Where pods (and their nodes) are known.
    pub store: Store,
    /// Who may call.
    pub auth: TokenFileAuthenticator,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// Lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime granted.
    pub max_ttl: Duration,
    /// Metrics.
    pub metrics: Registry,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").finish_non_exhaustive()
    }
}

impl CaService {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        tracing::warn!(reason, message = %status.message(), "certificate request refused");
        self.metrics
            .counter("ambit_ca_refused_total", &[("reason", reason.to_string())])
            .increment(1);
        status
    }

    fn sign(&self, request: Request<IstioCertificateRequest>) -> Result<Vec<String>, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata())
            .map_err(|s| self.refuse("unauthenticated", s))?;
        let body = request.into_inner();
        let requested = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                self.refuse(
                    "no-identity",
                    Status::permission_denied(
                        "request names no ImpersonatedIdentity; only node agents (ztunnel) are served",
                    ),
                )
            })?;
        let identity: Identity = requested.parse().map_err(|e| {
            self.refuse(
                "bad-identity",
                Status::invalid_argument(format!("ImpersonatedIdentity {requested:?}: {e}")),
            )
        })?;
        if identity.trust_domain() != self.trust_domain {
            return Err(self.refuse(
                "trust-domain",
                Status::permission_denied(format!(
                    "{identity} is not in trust domain {}",
                    self.trust_domain
                )),
            ));
        }
        let snapshot = self.store.snapshot();
        let on_node = snapshot.cluster.pods.values().any(|pod| {
            pod.metadata.namespace == identity.namespace()
                && pod.service_account() == identity.service_account()
                && pod.spec.node_name == caller.node
        });
        if !on_node {
            return Err(self.refuse(
                "not-on-node",
                Status::permission_denied(format!(
                    "no pod with service account {}/{} runs on node {} (caller {}); a ztunnel may only obtain identities of pods on its own node",
                    identity.namespace(),
                    identity.service_account(),
                    caller.node,
                    caller.account
                )),
            ));
        }
        let asked = u64::try_from(body.validity_duration).unwrap_or(0);
        let ttl = if asked == 0 {
            self.default_ttl
        } else {
            Duration::from_secs(asked).min(self.max_ttl)
        };
        let chain = self.ca.sign_csr(&body.csr, &identity, ttl).map_err(|e| {
            self.refuse(
                "bad-csr",
                Status::invalid_argument(format!("CSR for {identity}: {e}")),
            )
        })?;
        self.metrics
            .counter("ambit_ca_signed_total", &())
            .increment(1);
        tracing::info!(%identity, node = %caller.node, ttl = ?ttl, "certificate signed");
        Ok(chain)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let cert_chain = self.sign(request)?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
