//! The connection to the control plane shared by the xDS and CA clients: the gRPC channel (TLS
//! verified against a configured root, no client certificate), and the per-call metadata
//! (`authorization: Bearer <token>`, `clusterid`, operator-supplied extra headers).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::config::EnvReader;

use thiserror::Error;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where the bearer token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: no `authorization` or `clusterid` header is sent.
    None,
    /// A fixed token value.
    Static(String),
    /// A file read fresh for every call (projected service-account tokens rotate).
    File(PathBuf),
}

impl TokenSource {
    /// Interprets `AUTH_TOKEN` as upstream does: an existing file path, otherwise the token itself.
    pub fn from_setting(value: Option<&str>, default_file: &str) -> Self {
        match value {
            Some(v) if std::path::Path::new(v).is_file() => TokenSource::File(PathBuf::from(v)),
            Some(v) if !v.is_empty() => TokenSource::Static(v.to_string()),
            _ if std::path::Path::new(default_file).is_file() => {
                TokenSource::File(PathBuf::from(default_file))
            }
            _ => TokenSource::None,
        }
    }

    fn token(&self) -> Result<Option<String>, ControlError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|source| ControlError::Token {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

/// How to reach and authenticate to one control-plane endpoint (xDS or CA).
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `https://host:port` (a scheme-less value gets `https://`); `http://` disables TLS.
    pub address: String,
    /// PEM file of the root the server's certificate must chain to.
    pub root_ca: Option<PathBuf>,
    /// Name checked against the server certificate instead of the address's host.
    pub server_name: Option<String>,
    /// Bearer token.
    pub token: TokenSource,
    /// Sent as `clusterid` together with the token.
    pub cluster_id: String,
    /// Extra metadata (`XDS_HEADER_*`, `CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
    /// TCP connect plus TLS handshake limit.
    pub connect_timeout: Duration,
}

/// Failures talking to the control plane.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The configured address is not a URI.
    #[error("control plane address {address:?} is not a valid URI: {reason}")]
    Address {
        /// The address.
        address: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The root certificate file could not be read.
    #[error("cannot read the control plane root certificate {path}: {source}")]
    Root {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token file could not be read.
    #[error("cannot read the control plane token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A header name or value is not valid gRPC metadata.
    #[error("control plane header {name:?} is not valid gRPC metadata")]
    Header {
        /// The header.
        name: String,
    },
    /// Connecting failed (TCP, TLS or HTTP/2).
    #[error("cannot connect to the control plane at {address}: {reason}")]
    Connect {
        /// The address.
        address: String,
        /// What failed, with every cause.
        reason: String,
    },
}

impl ControlPlane {
    fn uri(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("https://{}", self.address)
        }
    }

    /// Opens a gRPC channel (connects eagerly so failures surface here).
    pub async fn connect(&self) -> Result<Channel, ControlError> {
        let uri = self.uri();
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| ControlError::Address {
                address: self.address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        if uri.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(path) = &self.root_ca {
                let pem = std::fs::read(path).map_err(|source| ControlError::Root {
                    path: path.clone(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ControlError::Connect {
                    address: self.address.clone(),
                    reason: error_chain(&e),
                })?;
        }
        endpoint.connect().await.map_err(|e| ControlError::Connect {
            address: self.address.clone(),
            reason: error_chain(&e),
        })
    }

    /// The metadata every call carries. Re-reads the token file each time.
    pub fn metadata(&self) -> Result<MetadataMap, ControlError> {
        let mut map = MetadataMap::new();
        if let Some(token) = self.token.token()? {
            insert(&mut map, "authorization", &format!("Bearer {token}"))?;
            insert(&mut map, "clusterid", &self.cluster_id)?;
        }
        for (name, value) in &self.headers {
            insert(&mut map, &name.to_ascii_lowercase(), value)?;
        }
        Ok(map)
    }
}

fn insert(map: &mut MetadataMap, name: &str, value: &str) -> Result<(), ControlError> {
    let bad = || ControlError::Header {
        name: name.to_string(),
    };
    let key = AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|_| bad())?;
    let value = AsciiMetadataValue::try_from(value).map_err(|_| bad())?;
    map.insert(key, value);
    Ok(())
}

/// An error with its whole `source()` chain, for logs and access lines.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Exponential backoff with jitter, bounded.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The next wait (with ±20% jitter), then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.max)
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_up_to_the_bound_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let waits: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        // 10, 20, 40, then 50 at most, each within ±20%.
        for (wait, base) in waits.iter().zip([10u64, 20, 40, 50, 50, 50]) {
            let base = Duration::from_millis(base);
            assert!(*wait >= base.mul_f64(0.8), "{waits:?}");
            assert!(
                *wait <= base.mul_f64(1.2).min(Duration::from_millis(50)),
                "{waits:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(12));
    }

    #[test]
    fn metadata_carries_the_token_cluster_and_extra_headers() {
        let control = ControlPlane {
            address: "istiod.istio-system.svc:15012".into(),
            root_ca: None,
            server_name: None,
            token: TokenSource::Static("t0ken".into()),
            cluster_id: "Kubernetes".into(),
            headers: vec![("X-Extra".into(), "yes".into())],
            connect_timeout: Duration::from_secs(1),
        };
        assert_eq!(control.uri(), "https://istiod.istio-system.svc:15012");
        let map = control.metadata().unwrap();
        assert_eq!(map.get("authorization").unwrap(), "Bearer t0ken");
        assert_eq!(map.get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(map.get("x-extra").unwrap(), "yes");

        let bad = ControlPlane {
            headers: vec![("bad header".into(), "x".into())],
            ..control
        };
        let error = bad.metadata().unwrap_err();
        assert_eq!(
            error.to_string(),
            "control plane header \"bad header\" is not valid gRPC metadata"
        );
    }
}

/// Where the token is when `AUTH_TOKEN` does not say (the projected token's mount).
const DEFAULT_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
/// Where the control plane's root is when `XDS_ROOT_CA` does not say.
const DEFAULT_ROOT: &str = "./var/run/secrets/istio/root-cert.pem";

/// The control-plane settings every proxy reads from its environment, with Istio's names:
/// `ISTIO_META_CLUSTER_ID` (or `CLUSTER_ID`), `XDS_ADDRESS` (istiod's Service in a cluster, else
/// localhost), `XDS_ROOT_CA`, `ALT_XDS_HOSTNAME`, `AUTH_TOKEN`, `CONNECT_TIMEOUT`, `XDS_HEADER_*`,
/// and for the CA `CA_ADDRESS` (default: the xDS address), `CA_ROOT_CA` (default: the xDS root),
/// `ALT_CA_HOSTNAME`, `CA_HEADER_*`.
#[derive(Clone, Debug)]
pub struct ControlPlaneEnv {
    /// The cluster id (`clusterid` header, metric label).
    pub cluster_id: String,
    /// Connect timeout to the control plane (and, for the proxies, upstreams).
    pub connect_timeout: Duration,
    /// The xDS server.
    pub xds: ControlPlane,
    /// The CA.
    pub ca: ControlPlane,
    /// `CA_ADDRESS` was given (otherwise `ca` is the xDS address).
    pub ca_address_given: bool,
}

impl ControlPlaneEnv {
    /// Reads the settings; bad values are recorded in `env` by name. `vars` are the process's
    /// variables, for the `*_HEADER_*` prefixes.
    pub fn read(env: &mut EnvReader<'_>, vars: &BTreeMap<String, String>) -> Self {
        let cluster_id = env
            .optional_string("ISTIO_META_CLUSTER_ID")
            .or_else(|| env.optional_string("CLUSTER_ID"))
            .unwrap_or_else(|| "Kubernetes".to_string());
        let in_cluster = env.optional_string("KUBERNETES_SERVICE_HOST").is_some();
        let default_xds = if in_cluster {
            "https://istiod.istio-system.svc:15012"
        } else {
            "https://localhost:15012"
        };
        let token_setting = env.secret_string("AUTH_TOKEN");
        let token = TokenSource::from_setting(token_setting.as_deref(), DEFAULT_TOKEN_FILE);
        let connect_timeout = env.duration("CONNECT_TIMEOUT", Duration::from_secs(10));
        let headers = |prefix: &str| -> Vec<(String, String)> {
            vars.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect()
        };
        let xds_address = env.string("XDS_ADDRESS", default_xds);
        let xds_root = env
            .optional_string("XDS_ROOT_CA")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(DEFAULT_ROOT)).filter(|p| p.is_file()));
        let xds = ControlPlane {
            address: xds_address.clone(),
            root_ca: xds_root.clone(),
            server_name: env.optional_string("ALT_XDS_HOSTNAME"),
            token: token.clone(),
            cluster_id: cluster_id.clone(),
            headers: headers("XDS_HEADER_"),
            connect_timeout,
        };
        let ca_address = env.optional_string("CA_ADDRESS");
        let ca_address_given = ca_address.is_some();
        let ca = ControlPlane {
            address: ca_address.unwrap_or(xds_address),
            root_ca: env
                .optional_string("CA_ROOT_CA")
                .map(PathBuf::from)
                .or(xds_root),
            server_name: env.optional_string("ALT_CA_HOSTNAME"),
            token,
            cluster_id: cluster_id.clone(),
            headers: headers("CA_HEADER_"),
            connect_timeout,
        };
        Self {
            cluster_id,
            connect_timeout,
            xds,
            ca,
            ca_address_given,
        }
    }
}
