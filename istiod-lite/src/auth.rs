//! Who is calling. Two authenticators share one interface ([`Authenticator`]): in the lab every
//! node's ztunnel gets a token from a tokens file written by the lab ([`TokenFileAuthenticator`]);
//! in Kubernetes the bearer token is checked with a TokenReview for audience `istio-ca`
//! ([`TokenReviewAuthenticator`]). Every refusal says why, with a short reason for metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::store::Store;

/// The audience Istio's CA and xDS tokens are minted for.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";
/// TokenReview user extra: the node a bound token's pod runs on (Kubernetes 1.30+).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// TokenReview user extra: the pod a bound token belongs to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview user extra: that pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The namespace of the caller's service account.
    pub namespace: String,
    /// The caller's service account.
    pub service_account: String,
    /// The node the caller runs on, when known (needed to impersonate pods on it).
    pub node: Option<String>,
}

impl Caller {
    /// `namespace/service-account`, as `--trusted-node-accounts` names accounts.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// Why a caller was refused: a short reason (the `reason` label of
/// `ambit_ca_refused_total`) and the gRPC status the caller gets, whose message explains it.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// Short machine-readable reason, e.g. `unknown-token`.
    pub reason: &'static str,
    /// What the caller is told.
    pub status: Status,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            status: Status::unauthenticated(message.into()),
        }
    }

    fn unavailable(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            status: Status::unavailable(message.into()),
        }
    }
}

/// The bearer token of `metadata`'s `authorization: Bearer <token>`.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Refusal> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| {
            Refusal::unauthenticated("no-token", "no bearer token: set AUTH_TOKEN on the client")
        })?
        .to_str()
        .map_err(|_| Refusal::unauthenticated("no-token", "authorization header is not text"))?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            Refusal::unauthenticated("no-token", "authorization header is not `Bearer <token>`")
        })?
        .trim();
    if token.is_empty() {
        return Err(Refusal::unauthenticated(
            "no-token",
            "authorization header carries an empty bearer token",
        ));
    }
    Ok(token)
}

/// Authenticates callers of the CA and xDS: one of the two implementations. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// Tokens from a file (the lab).
    TokensFile(TokenFileAuthenticator),
    /// Kubernetes TokenReview (Kubernetes mode).
    TokenReview(TokenReviewAuthenticator),
}

impl From<TokenFileAuthenticator> for Authenticator {
    fn from(auth: TokenFileAuthenticator) -> Self {
        Authenticator::TokensFile(auth)
    }
}

impl From<TokenReviewAuthenticator> for Authenticator {
    fn from(auth: TokenReviewAuthenticator) -> Self {
        Authenticator::TokenReview(auth)
    }
}

impl Authenticator {
    /// The caller behind `metadata`'s `authorization: Bearer <token>`.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Refusal> {
        let token = bearer_token(metadata)?;
        match self {
            Authenticator::TokensFile(auth) => auth.authenticate_token(token),
            Authenticator::TokenReview(auth) => auth.authenticate_token(token).await,
        }
    }
}

#[derive(Debug, Deserialize)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenEntry {
    token: String,
    node: String,
    #[serde(default = "default_account")]
    service_account: String,
}

fn default_account() -> String {
    "istio-system/ztunnel".to_string()
}

/// Checks bearer tokens against a tokens file (re-read on every call, so the lab can add nodes).
#[derive(Clone, Debug)]
pub struct TokenFileAuthenticator {
    path: PathBuf,
}

impl TokenFileAuthenticator {
    /// Tokens from `path`: `{"tokens": [{"token": "...", "node": "node-1",
    /// "serviceAccount": "istio-system/ztunnel"}]}` (`serviceAccount` defaults to the ztunnel's).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The caller behind `metadata`'s `authorization: Bearer <token>`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Refusal> {
        self.authenticate_token(bearer_token(metadata)?)
    }

    fn authenticate_token(&self, token: &str) -> Result<Caller, Refusal> {
        let path = self.path.display();
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            Refusal::unavailable("tokens-file", format!("tokens file {path} unreadable: {e}"))
        })?;
        let file: TokensFile = serde_json::from_str(&text).map_err(|e| {
            Refusal::unavailable("tokens-file", format!("tokens file {path} is invalid: {e}"))
        })?;
        let (index, entry) = file
            .tokens
            .into_iter()
            .enumerate()
            .find(|(_, t)| t.token == token)
            .ok_or_else(|| Refusal::unauthenticated("unknown-token", "unknown bearer token"))?;
        let (namespace, service_account) = entry
            .service_account
            .split_once('/')
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
            .ok_or_else(|| {
                Refusal::unavailable(
                    "tokens-file",
                    format!(
                        "tokens file {path}: tokens[{index}].serviceAccount {:?} is not \
                         `namespace/name`",
                        entry.service_account
                    ),
                )
            })?;
        Ok(Caller {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            node: Some(entry.node).filter(|n| !n.is_empty()),
        })
    }
}

/// What a successful TokenReview said about a token (cached; never holds the token).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reviewed {
    namespace: String,
    service_account: String,
    node: Option<String>,
    pod: Option<(String, Option<String>)>,
}

/// Settings of the TokenReview authenticator.
#[derive(Clone, Debug)]
pub struct TokenReviewConfig {
    /// The audiences asked for; the review must return at least [`ISTIO_CA_AUDIENCE`].
    pub audiences: Vec<String>,
    /// How long a positive review is reused.
    pub cache_ttl: Duration,
    /// How many positive reviews are kept at most.
    pub cache_size: usize,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        TokenReviewConfig {
            audiences: vec![ISTIO_CA_AUDIENCE.to_string()],
            cache_ttl: Duration::from_secs(30),
            cache_size: 4096,
        }
    }
}

type TokenHash = [u8; 32];

/// Positive reviews by token hash, each kept for at most `ttl`, at most `size` of them.
#[derive(Debug, Default)]
struct ReviewCache {
    entries: HashMap<TokenHash, (Instant, Reviewed)>,
}

impl ReviewCache {
    fn get(&mut self, hash: &TokenHash, ttl: Duration) -> Option<Reviewed> {
        match self.entries.get(hash) {
            Some((at, reviewed)) if at.elapsed() < ttl => Some(reviewed.clone()),
            Some(_) => {
                self.entries.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Adds a review, first dropping expired ones and then the oldest while full.
    fn insert(&mut self, hash: TokenHash, reviewed: Reviewed, ttl: Duration, size: usize) {
        if size == 0 {
            return;
        }
        if self.entries.len() >= size {
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        while self.entries.len() >= size {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.entries.insert(hash, (Instant::now(), reviewed));
    }
}

/// Checks bearer tokens with the API server's TokenReview (`authentication.k8s.io/v1`), for
/// audience `istio-ca`. The caller must be a service account; its node comes from the token's
/// `node-name` extra, else from the pod the token is bound to (which must exist in `store`).
/// Positive reviews are cached briefly, keyed by a SHA-256 of the token.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    store: Store,
    config: TokenReviewConfig,
    cache: Arc<Mutex<ReviewCache>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Reviews tokens through `client`; bound pods are looked up in `store`.
    pub fn new(client: kube::Client, store: Store, config: TokenReviewConfig) -> Self {
        Self {
            client,
            store,
            config,
            cache: Arc::new(Mutex::new(ReviewCache::default())),
        }
    }

    /// Number of cached positive reviews (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }

    /// The caller behind `metadata`'s `authorization: Bearer <token>`.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Refusal> {
        self.authenticate_token(bearer_token(metadata)?).await
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, Refusal> {
        let hash = token_hash(token);
        let reviewed = match self.cached_review(&hash) {
            Some(reviewed) => reviewed,
            None => {
                let reviewed = self.review(token).await?;
                self.remember(hash, reviewed.clone());
                reviewed
            }
        };
        self.caller(reviewed)
    }

    fn cached_review(&self, hash: &TokenHash) -> Option<Reviewed> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash, self.config.cache_ttl)
    }

    fn remember(&self, hash: TokenHash, reviewed: Reviewed) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            hash,
            reviewed,
            self.config.cache_ttl,
            self.config.cache_size,
        );
    }

    async fn review(&self, token: &str) -> Result<Reviewed, Refusal> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.config.audiences.clone()),
            },
            ..Default::default()
        };
        let response = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| {
                Refusal::unavailable(
                    "token-review-failed",
                    format!("TokenReview against the API server failed: {e}"),
                )
            })?;
        let status = response.status.unwrap_or_default();
        check_review(&status, &self.config.audiences)
    }

    /// The caller, with its node from the token or from its pod in the store.
    fn caller(&self, reviewed: Reviewed) -> Result<Caller, Refusal> {
        let mut node = reviewed.node.clone();
        if let Some((pod_name, pod_uid)) = &reviewed.pod {
            let snapshot = self.store.snapshot();
            let key = (reviewed.namespace.clone(), pod_name.clone());
            let pod = snapshot.cluster.pods.get(&key).filter(|pod| {
                pod_uid
                    .as_ref()
                    .is_none_or(|uid| pod.metadata.uid.is_empty() || pod.metadata.uid == *uid)
            });
            let Some(pod) = pod else {
                return Err(Refusal::unauthenticated(
                    "caller-pod-missing",
                    format!(
                        "the token is bound to pod {}/{pod_name}{} which does not exist",
                        reviewed.namespace,
                        pod_uid
                            .as_ref()
                            .map(|u| format!(" (uid {u})"))
                            .unwrap_or_default()
                    ),
                ));
            };
            if node.is_none() && !pod.spec.node_name.is_empty() {
                node = Some(pod.spec.node_name.clone());
            }
        }
        Ok(Caller {
            namespace: reviewed.namespace,
            service_account: reviewed.service_account,
            node,
        })
    }
}

/// A SHA-256 of the token: the cache key (the token itself is never kept or logged).
fn token_hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Whether the review authenticates a service account for one of `audiences`.
fn check_review(status: &TokenReviewStatus, audiences: &[String]) -> Result<Reviewed, Refusal> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("the API server did not authenticate it");
        return Err(Refusal::unauthenticated(
            "unknown-token",
            format!("bearer token refused by TokenReview: {why}"),
        ));
    }
    let returned = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| returned.contains(a)) {
        return Err(Refusal::unauthenticated(
            "wrong-audience",
            format!(
                "bearer token is not for audience {}: TokenReview returned audiences {returned:?}",
                audiences.join(", ")
            ),
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| {
            Refusal::unauthenticated(
                "not-service-account",
                format!(
                    "bearer token belongs to {username:?}, not a service account \
                     (system:serviceaccount:<namespace>:<name>)"
                ),
            )
        })?;
    let extra: BTreeMap<String, Vec<String>> = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(Reviewed {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        node: first(EXTRA_NODE_NAME),
        pod: first(EXTRA_POD_NAME).map(|name| (name, first(EXTRA_POD_UID))),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_string()),
                extra: Some(
                    [
                        (EXTRA_POD_NAME.to_string(), vec!["zt-1".to_string()]),
                        (EXTRA_POD_UID.to_string(), vec!["u-1".to_string()]),
                    ]
                    .into_iter()
                    .collect(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn audiences() -> Vec<String> {
        vec![ISTIO_CA_AUDIENCE.to_string()]
    }

    #[test]
    fn reviews_name_the_service_account_and_bound_pod() {
        let reviewed = check_review(
            &status(
                true,
                &["istio-ca"],
                "system:serviceaccount:istio-system:ztunnel",
            ),
            &audiences(),
        )
        .unwrap();
        assert_eq!(reviewed.namespace, "istio-system");
        assert_eq!(reviewed.service_account, "ztunnel");
        assert_eq!(reviewed.node, None);
        assert_eq!(
            reviewed.pod,
            Some(("zt-1".to_string(), Some("u-1".to_string())))
        );
    }

    #[test]
    fn reviews_are_refused_with_reasons() {
        let refused = |s: TokenReviewStatus| check_review(&s, &audiences()).unwrap_err();
        let r = refused(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token expired".into()),
            ..Default::default()
        });
        assert_eq!(r.reason, "unknown-token");
        assert!(r.status.message().contains("token expired"), "{r:?}");
        let r = refused(status(true, &["api"], "system:serviceaccount:a:b"));
        assert_eq!(r.reason, "wrong-audience");
        assert!(r.status.message().contains("[\"api\"]"), "{r:?}");
        let r = refused(status(true, &["istio-ca"], "alice"));
        assert_eq!(r.reason, "not-service-account");
        assert!(r.status.message().contains("alice"), "{r:?}");
        let r = refused(status(true, &["istio-ca"], "system:serviceaccount:onlyns"));
        assert_eq!(r.reason, "not-service-account");
    }

    #[test]
    fn tokens_file_accounts_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(
            &path,
            r#"{"tokens": [{"token": "a", "node": "n1"},
                           {"token": "b", "node": "n2", "serviceAccount": "demo/web"},
                           {"token": "c", "node": "n3", "serviceAccount": "nonsense"}]}"#,
        )
        .unwrap();
        let auth = TokenFileAuthenticator::new(path);
        let a = auth.authenticate_token("a").unwrap();
        assert_eq!(
            (a.account(), a.node.as_deref()),
            ("istio-system/ztunnel".to_string(), Some("n1"))
        );
        assert_eq!(auth.authenticate_token("b").unwrap().account(), "demo/web");
        let c = auth.authenticate_token("c").unwrap_err();
        assert!(
            c.status.message().contains("tokens[2].serviceAccount"),
            "{c:?}"
        );
        assert_eq!(
            auth.authenticate_token("z").unwrap_err().reason,
            "unknown-token"
        );
    }

    #[test]
    fn the_review_cache_is_bounded_in_size_and_time() {
        let reviewed = |sa: &str| Reviewed {
            namespace: "ns".into(),
            service_account: sa.into(),
            node: None,
            pod: None,
        };
        let ttl = Duration::from_millis(200);
        let mut cache = ReviewCache::default();
        let (a, b, c) = (token_hash("a"), token_hash("b"), token_hash("c"));
        cache.insert(a, reviewed("a"), ttl, 2);
        std::thread::sleep(Duration::from_millis(5));
        cache.insert(b, reviewed("b"), ttl, 2);
        cache.insert(c, reviewed("c"), ttl, 2);
        assert_eq!(cache.entries.len(), 2, "never more than the size");
        assert_eq!(cache.get(&a, ttl), None, "the oldest made room");
        assert_eq!(cache.get(&c, ttl), Some(reviewed("c")));
        std::thread::sleep(ttl);
        assert_eq!(cache.get(&b, ttl), None, "expired");
        assert_eq!(cache.entries.len(), 1);
        cache.insert(a, reviewed("a"), ttl, 0);
        assert_eq!(cache.get(&a, ttl), None, "size 0 caches nothing");
    }

    #[test]
    fn token_hashes_are_sha256() {
        let hash = token_hash("abc");
        assert_eq!(hash[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
