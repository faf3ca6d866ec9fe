//! Who is calling. In the lab every node's ztunnel gets a token from a tokens file written by the
//! lab; in Kubernetes the bearer token is checked with a TokenReview (audience `istio-ca`), which
//! arrives with the Kubernetes source. Every refusal says why.

use std::path::PathBuf;

use serde::Deserialize;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node whose ztunnel this is (may impersonate pods on it).
    pub node: String,
    /// The caller's own identity (`namespace/service-account`), for logs.
    pub account: String,
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
    /// Tokens from `path`: `{"tokens": [{"token": "...", "node": "node-1"}]}`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The caller behind `metadata`'s `authorization: Bearer <token>`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated("no bearer token: set AUTH_TOKEN on the client")
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization header is not `Bearer <token>`"))?
            .trim();
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            Status::unavailable(format!(
                "tokens file {} unreadable: {e}",
                self.path.display()
            ))
        })?;
        let file: TokensFile = serde_json::from_str(&text).map_err(|e| {
            Status::unavailable(format!(
                "tokens file {} is invalid: {e}",
                self.path.display()
            ))
        })?;
        file.tokens
            .into_iter()
            .find(|t| t.token == token)
            .map(|t| Caller {
                node: t.node,
                account: t.service_account,
            })
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }
}
