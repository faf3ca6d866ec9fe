//! The CA: where its key lives (a directory here; Kubernetes Secrets in [`crate::kube_ca`]), the
//! checks an operator-provided CA must pass, and the Istio `CreateCertificate` API.
//!
//! Authorization is strict: a caller without `ImpersonatedIdentity` gets its own identity; only
//! trusted node accounts (ztunnel) may impersonate, and only identities of pods scheduled on the
//! caller's own node; the CSR must name exactly the authorized identity with an acceptable key;
//! lifetimes are capped. Every refusal names the reason and is counted in
//! `ambit_ca_refused_total{reason}`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::metrics::Registry;
use ambit_identity::Identity;
use ambit_identity::ca::{CaError, CertificateAuthority};
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateService;
use ambit_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use anyhow::{Context as _, bail};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::auth::{Authenticator, Caller};
use crate::store::Store;

/// The operator CA's certificate (signs workload certificates).
pub const CA_CERT: &str = "ca-cert.pem";
/// The operator CA's private key (PKCS#8).
pub const CA_KEY: &str = "ca-key.pem";
/// The chain from `ca-cert.pem` up to the root (may start with `ca-cert.pem` itself and end with
/// the root; empty or absent when `ca-cert.pem` is the root or signed by it directly).
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The root(s) workloads trust.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Lifetime of a generated self-signed root, as Istio's default.
pub const SELF_SIGNED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86400);

/// The four parts of a CA, as text, as the operator provides them (Istio's `cacerts` layout).
#[derive(Clone, Debug, Default)]
pub struct CaMaterial {
    /// `ca-cert.pem`.
    pub ca_cert: String,
    /// `ca-key.pem`.
    pub ca_key: String,
    /// `cert-chain.pem`, if present.
    pub cert_chain: Option<String>,
    /// `root-cert.pem`, if present.
    pub root_cert: Option<String>,
}

/// A checked CA and the root(s) workloads must trust (PEM).
#[derive(Debug)]
pub struct LoadedCa {
    /// The signer.
    pub ca: CertificateAuthority,
    /// What workloads trust: `root-cert.pem` (for a generated root, the root itself).
    pub root_pem: String,
}

/// One PEM certificate block as text and DER.
#[derive(Clone)]
struct Block {
    text: String,
    der: Vec<u8>,
}

/// The certificate blocks of `text` (`name` names where it came from, for errors).
fn cert_blocks(text: &str, name: &str) -> anyhow::Result<Vec<Block>> {
    let mut blocks = Vec::new();
    for (index, piece) in text
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .enumerate()
    {
        let start = piece.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
        let block = &piece[start..];
        let der = pem::parse(block)
            .map_err(|e| anyhow::anyhow!("{name}: certificate {index} is not valid PEM: {e}"))?
            .into_contents();
        X509Certificate::from_der(&der).map_err(|e| {
            anyhow::anyhow!("{name}: certificate {index} is not a valid X.509 certificate: {e}")
        })?;
        blocks.push(Block {
            text: format!("{block}\n"),
            der,
        });
    }
    Ok(blocks)
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    // Only called on DER that `cert_blocks` already parsed.
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .expect("certificate parsed before")
}

fn subject(cert: &X509Certificate<'_>) -> String {
    match cert.subject().to_string() {
        s if s.is_empty() => "(empty subject)".to_string(),
        s => s,
    }
}

fn self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

/// Checks an operator's CA: `ca-key.pem` matches `ca-cert.pem`; `ca-cert.pem` is a CA allowed to
/// sign and not expired; it chains through `cert-chain.pem` to `root-cert.pem` (every link's
/// signature verified); the root workloads get is `root-cert.pem`. When `root-cert.pem` is absent
/// the root is the self-signed top of the chain. `name` turns a key (`ca-key.pem`) into how the
/// operator knows it (a path, or a Secret's key), so every error names the file at fault.
pub fn check_ca(material: &CaMaterial, name: &dyn Fn(&str) -> String) -> anyhow::Result<LoadedCa> {
    let ca_blocks = cert_blocks(&material.ca_cert, &name(CA_CERT))?;
    let ca_block = match ca_blocks.as_slice() {
        [] => bail!("{}: holds no PEM certificate", name(CA_CERT)),
        [one] => one,
        more => bail!(
            "{}: holds {} certificates; it must hold only the CA certificate (put the chain \
             above it in {})",
            name(CA_CERT),
            more.len(),
            name(CERT_CHAIN)
        ),
    };
    let ca_cert = parse(&ca_block.der);
    let signer = CertificateAuthority::from_pem(&ca_block.text, &material.ca_key, &[]).map_err(
        |e| match e {
            CaError::KeyPem { .. } => anyhow::anyhow!("{}: {e}", name(CA_KEY)),
            CaError::KeyMismatch { subject } => anyhow::anyhow!(
                "{} does not match {}: the key is not the private key of the CA \
                     certificate {subject}",
                name(CA_KEY),
                name(CA_CERT)
            ),
            CaError::NotACa { subject } => anyhow::anyhow!(
                "{}: the certificate {subject} is not allowed to sign certificates (it needs \
                     basicConstraints CA:TRUE and keyUsage keyCertSign)",
                name(CA_CERT)
            ),
            other => anyhow::anyhow!("{}: {other}", name(CA_CERT)),
        },
    )?;
    drop(signer);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = ca_cert.validity();
    if validity.not_after.timestamp() <= now {
        bail!(
            "{}: the CA certificate {} expired at {}",
            name(CA_CERT),
            subject(&ca_cert),
            validity.not_after
        );
    }

    let mut chain = match &material.cert_chain {
        Some(text) => cert_blocks(text, &name(CERT_CHAIN))?,
        None => Vec::new(),
    };
    if chain.first().is_some_and(|b| b.der == ca_block.der) {
        chain.remove(0);
    }
    let (roots, root_text) = match &material.root_cert {
        Some(text) => {
            let roots = cert_blocks(text, &name(ROOT_CERT))?;
            if roots.is_empty() {
                bail!("{}: holds no PEM certificate", name(ROOT_CERT));
            }
            let text: String = roots.iter().map(|b| b.text.as_str()).collect();
            (roots, text)
        }
        None => {
            let top = chain.last().unwrap_or(ca_block);
            if !self_signed(&parse(&top.der)) {
                bail!(
                    "{} is missing and the top of the chain ({}) is not a self-signed root; \
                     provide the root in {}",
                    name(ROOT_CERT),
                    subject(&parse(&top.der)),
                    name(ROOT_CERT)
                );
            }
            let root = chain.pop().unwrap_or_else(|| ca_block.clone());
            let text = root.text.clone();
            (vec![root], text)
        }
    };
    while chain
        .last()
        .is_some_and(|b| roots.iter().any(|r| r.der == b.der))
    {
        chain.pop();
    }

    // ca-cert.pem → intermediates (cert-chain.pem) → one of root-cert.pem's roots.
    let mut child = ca_cert;
    let mut child_name = name(CA_CERT);
    for (index, block) in chain.iter().enumerate() {
        let parent = parse(&block.der);
        if !parent.is_ca() {
            bail!(
                "{}: certificate {index} ({}) is not a CA certificate",
                name(CERT_CHAIN),
                subject(&parent)
            );
        }
        if child.verify_signature(Some(parent.public_key())).is_err() {
            bail!(
                "{}: certificate {index} ({}) did not sign {child_name} ({}, issued by {}); \
                 list the chain in order from {} up to the root",
                name(CERT_CHAIN),
                subject(&parent),
                subject(&child),
                child.issuer(),
                name(CA_CERT)
            );
        }
        child = parent;
        child_name = format!("{} certificate {index}", name(CERT_CHAIN));
    }
    let anchored = roots.iter().any(|root| {
        let root = parse(&root.der);
        root.as_raw() == child.as_raw() || child.verify_signature(Some(root.public_key())).is_ok()
    });
    if !anchored {
        let subjects: Vec<String> = roots.iter().map(|r| subject(&parse(&r.der))).collect();
        bail!(
            "{} does not chain to {}: {child_name} ({}) is issued by {}, but the roots are [{}]{}",
            name(CA_CERT),
            name(ROOT_CERT),
            subject(&child),
            child.issuer(),
            subjects.join("; "),
            if chain.is_empty() {
                format!(" (no intermediates in {})", name(CERT_CHAIN))
            } else {
                String::new()
            }
        );
    }

    let ca_is_root = roots.len() == 1 && roots[0].der == ca_block.der;
    let mut above: Vec<String> = chain.iter().map(|b| b.text.clone()).collect();
    if !ca_is_root {
        // The response's last element is the root bundle, as upstream istiod sends it.
        above.push(root_text.clone());
    }
    let ca = CertificateAuthority::from_pem(&ca_block.text, &material.ca_key, &above)
        .map_err(|e| anyhow::anyhow!("{}: {e}", name(CA_CERT)))?;
    Ok(LoadedCa {
        ca,
        root_pem: root_text,
    })
}

/// A fresh self-signed root (ECDSA P-256, 10 years) as the material kept for it: `ca-cert.pem`
/// and `root-cert.pem` are the root, `cert-chain.pem` is empty.
pub fn generate_root(trust_domain: &str) -> anyhow::Result<CaMaterial> {
    let ca = CertificateAuthority::generate_root(trust_domain, SELF_SIGNED_ROOT_TTL)?;
    Ok(CaMaterial {
        ca_cert: ca.cert_pem(),
        ca_key: ca.key_pem(),
        cert_chain: Some(String::new()),
        root_cert: Some(ca.cert_pem()),
    })
}

/// Directory mode. Loads the CA in `dir` (`ca-cert.pem`, `ca-key.pem`, optional `cert-chain.pem`
/// and `root-cert.pem`, checked by [`check_ca`]), or on first start generates a root there with
/// owner-only permissions. Files the operator provided are never rewritten: only a missing
/// `root-cert.pem` is created (from the checked chain), so workloads can read the root there.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> anyhow::Result<CertificateAuthority> {
    load_or_create_dir(dir, trust_domain).map(|loaded| loaded.ca)
}

/// As [`load_or_create`], also returning the root workloads trust.
pub fn load_or_create_dir(dir: &Path, trust_domain: &str) -> anyhow::Result<LoadedCa> {
    let path = |file: &str| dir.join(file);
    let name = |file: &str| dir.join(file).display().to_string();
    let read_optional = |file: &str| -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(path(file)) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: cannot read: {e}", name(file))),
        }
    };
    let cert = read_optional(CA_CERT)?;
    let key = read_optional(CA_KEY)?;
    let loaded = match (cert, key) {
        (Some(ca_cert), Some(ca_key)) => {
            let material = CaMaterial {
                ca_cert,
                ca_key,
                cert_chain: read_optional(CERT_CHAIN)?,
                root_cert: read_optional(ROOT_CERT)?,
            };
            let loaded = check_ca(&material, &name)?;
            if material.root_cert.is_none() {
                write_new(&path(ROOT_CERT), &loaded.root_pem, 0o644)?;
                tracing::info!(file = %name(ROOT_CERT), "wrote the root of the operator's CA");
            }
            tracing::info!(dir = %dir.display(), "loaded the CA");
            loaded
        }
        (Some(_), None) => bail!(
            "{} exists but {} does not: provide both, or neither to generate a root",
            name(CA_CERT),
            name(CA_KEY)
        ),
        (None, Some(_)) => bail!(
            "{} exists but {} does not: provide both, or neither to generate a root",
            name(CA_KEY),
            name(CA_CERT)
        ),
        (None, None) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the CA directory {}", dir.display()))?;
            let material = generate_root(trust_domain)?;
            write_new(&path(CA_KEY), &material.ca_key, 0o600)?;
            write_new(&path(CA_CERT), &material.ca_cert, 0o600)?;
            write_new(
                &path(ROOT_CERT),
                material.root_cert.as_deref().unwrap_or_default(),
                0o600,
            )?;
            tracing::info!(dir = %dir.display(), "generated a new root CA");
            check_ca(&material, &name)?
        }
    };
    Ok(loaded)
}

/// Creates `path` with `mode`; never replaces an existing file.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// The `IstioCertificateService` implementation.
#[derive(Clone)]
pub struct CaService {
    /// The signer.
    pub ca: Arc<CertificateAuthority>,
    /// Where pods (and their nodes) are known.
    pub store: Store,
    /// Who may call.
    pub auth: Authenticator,
    /// Accounts (`namespace/name`) that may ask for other identities (`ImpersonatedIdentity`),
    /// for pods on their own node.
    pub trusted_node_accounts: Vec<String>,
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

/// The trusted node accounts by default: upstream's `CA_TRUSTED_NODE_ACCOUNTS`.
pub fn default_trusted_node_accounts() -> Vec<String> {
    vec!["istio-system/ztunnel".to_string()]
}

/// Checks one `--trusted-node-accounts` entry: `namespace/name`.
pub fn parse_node_account(value: &str) -> Result<String, String> {
    match value.trim().split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(format!("{ns}/{name}"))
        }
        _ => Err(format!(
            "trusted node account {value:?} is not `namespace/service-account`"
        )),
    }
}

/// Registers the CA's metric help texts.
pub fn describe_metrics(metrics: &Registry) {
    metrics.describe_counter("ambit_ca_signed_total", "Workload certificates signed");
    metrics.describe_counter(
        "ambit_ca_refused_total",
        "Certificate requests refused, by reason",
    );
}

impl CaService {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        tracing::warn!(reason, message = %status.message(), "certificate request refused");
        self.metrics
            .counter("ambit_ca_refused_total", &[("reason", reason.to_string())])
            .increment(1);
        status
    }

    /// The identity `caller` may obtain when it asks for `requested` (`ImpersonatedIdentity`).
    fn authorize_impersonation(
        &self,
        caller: &Caller,
        requested: &str,
    ) -> Result<Identity, Status> {
        let account = caller.account();
        if !self.trusted_node_accounts.contains(&account) {
            return Err(self.refuse(
                "impersonation-not-allowed",
                Status::permission_denied(format!(
                    "caller {account} may not ask for ImpersonatedIdentity {requested:?}: only \
                     trusted node accounts ({}) may; omit it to get the caller's own identity",
                    self.trusted_node_accounts.join(", ")
                )),
            ));
        }
        let Some(node) = caller.node.as_deref() else {
            return Err(self.refuse(
                "unknown-node",
                Status::permission_denied(format!(
                    "the node of caller {account} is unknown (its token names no node and no \
                     pod), so it may not impersonate"
                )),
            ));
        };
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
        if !snapshot.has_pod_on_node(node, identity.namespace(), identity.service_account()) {
            return Err(self.refuse(
                "not-on-node",
                Status::permission_denied(format!(
                    "no pod with service account {}/{} runs on node {node} (caller {account}); \
                     a ztunnel may only obtain identities of pods on its own node",
                    identity.namespace(),
                    identity.service_account(),
                )),
            ));
        }
        Ok(identity)
    }

    async fn sign(&self, request: Request<IstioCertificateRequest>) -> Result<Vec<String>, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata())
            .await
            .map_err(|r| self.refuse(r.reason, r.status))?;
        let body = request.into_inner();
        let requested = match body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| v.kind.as_ref())
        {
            None => None,
            Some(Kind::StringValue(s)) if s.is_empty() => None,
            Some(Kind::StringValue(s)) => Some(s.clone()),
            Some(other) => {
                return Err(self.refuse(
                    "bad-identity",
                    Status::invalid_argument(format!(
                        "metadata.ImpersonatedIdentity must be a string, not {other:?}"
                    )),
                ));
            }
        };
        let identity = match requested {
            Some(requested) => self.authorize_impersonation(&caller, &requested)?,
            None => Identity::new(
                &self.trust_domain,
                &caller.namespace,
                &caller.service_account,
            )
            .map_err(|e| {
                self.refuse(
                    "bad-identity",
                    Status::invalid_argument(format!(
                        "caller {} has no valid identity: {e}",
                        caller.account()
                    )),
                )
            })?,
        };
        let cap = self.max_ttl;
        let ttl = match u64::try_from(body.validity_duration) {
            Ok(asked) if asked > 0 => Duration::from_secs(asked).min(cap),
            _ => self.default_ttl.min(cap),
        };
        let chain = self.ca.sign_csr(&body.csr, &identity, ttl).map_err(|e| {
            let reason = match e {
                CaError::SanMismatch { .. } | CaError::MissingSan { .. } => "san-mismatch",
                CaError::UnsupportedKey { .. } => "weak-key",
                _ => "bad-csr",
            };
            self.refuse(
                reason,
                Status::invalid_argument(format!("CSR for {identity}: {e}")),
            )
        })?;
        self.metrics
            .counter("ambit_ca_signed_total", &())
            .increment(1);
        tracing::info!(%identity, caller = %caller.account(), node = ?caller.node, ttl = ?ttl, "certificate signed");
        Ok(chain)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let cert_chain = self.sign(request).await?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
