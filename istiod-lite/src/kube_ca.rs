//! The CA in Kubernetes: its key in Secrets of the control-plane namespace, and its root
//! published to every namespace as ConfigMap `istio-ca-root-cert`.
//!
//! Storage, in order: Secret `cacerts` is the operator's CA (checked as in directory mode, with
//! errors naming the Secret and key); else Secret `istio-ca-secret` holds our self-signed root;
//! else a root is generated and `istio-ca-secret` created. When another replica creates it first
//! (409), the stored one is read and used, so every replica signs with the same root.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::ca::{self, CaMaterial, LoadedCa};

/// The operator's CA (Istio's name).
pub const CACERTS_SECRET: &str = "cacerts";
/// The self-signed root istiod-lite generated (Istio's name).
pub const SELF_SIGNED_SECRET: &str = "istio-ca-secret";
/// The Secret type Istio gives `istio-ca-secret`.
pub const SELF_SIGNED_SECRET_TYPE: &str = "istio.io/ca-root";
/// The ConfigMap holding the root in every namespace.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Its key.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// The CA material in `secret` (`namespace/name`); empty keys count as absent.
fn secret_material(secret: &Secret, namespace: &str) -> anyhow::Result<CaMaterial> {
    let name = secret.name_any();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in secret.data.iter().flatten() {
        let text = String::from_utf8(value.0.clone()).map_err(|_| {
            anyhow::anyhow!("Secret {namespace}/{name} key {key}: is not UTF-8 PEM text")
        })?;
        values.insert(key.clone(), text);
    }
    // stringData is write-only on a real API server; accept it where it is stored as such.
    for (key, value) in secret.string_data.iter().flatten() {
        values.entry(key.clone()).or_insert_with(|| value.clone());
    }
    let mut take = |key: &str| values.remove(key).filter(|v| !v.trim().is_empty());
    let required = |value: Option<String>, key: &str| {
        value.ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name}: key {key} is missing"))
    };
    Ok(CaMaterial {
        ca_cert: required(take(ca::CA_CERT), ca::CA_CERT)?,
        ca_key: required(take(ca::CA_KEY), ca::CA_KEY)?,
        cert_chain: take(ca::CERT_CHAIN),
        root_cert: take(ca::ROOT_CERT),
    })
}

fn check_secret(secret: &Secret, namespace: &str) -> anyhow::Result<LoadedCa> {
    let name = secret.name_any();
    let material = secret_material(secret, namespace)?;
    if name == CACERTS_SECRET && material.root_cert.is_none() {
        anyhow::bail!(
            "Secret {namespace}/{name}: key {} is missing (the operator's root workloads trust)",
            ca::ROOT_CERT
        );
    }
    ca::check_ca(&material, &|key| {
        format!("Secret {namespace}/{name} key {key}")
    })
}

/// Loads the CA from Secret `cacerts` or `istio-ca-secret` in `namespace`, or generates a root
/// (ECDSA P-256, 10 years) and creates `istio-ca-secret`.
pub async fn load_or_create_in_secrets(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<LoadedCa> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let get = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(name)
                .await
                .map_err(|e| anyhow::anyhow!("reading Secret {namespace}/{name} for the CA: {e}"))
        }
    };
    if let Some(secret) = get(CACERTS_SECRET).await? {
        let loaded = check_secret(&secret, namespace)?;
        tracing::info!(secret = %format!("{namespace}/{CACERTS_SECRET}"), "using the operator's CA");
        return Ok(loaded);
    }
    if let Some(secret) = get(SELF_SIGNED_SECRET).await? {
        let loaded = check_secret(&secret, namespace)?;
        tracing::info!(secret = %format!("{namespace}/{SELF_SIGNED_SECRET}"), "using the stored self-signed root");
        return Ok(loaded);
    }
    let material = ca::generate_root(trust_domain)?;
    let data: BTreeMap<String, ByteString> = [
        (ca::CA_CERT, &material.ca_cert),
        (ca::CA_KEY, &material.ca_key),
        (
            ca::CERT_CHAIN,
            material.cert_chain.as_ref().unwrap_or(&String::new()),
        ),
        (
            ca::ROOT_CERT,
            material.root_cert.as_ref().unwrap_or(&material.ca_cert),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SELF_SIGNED_SECRET.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        type_: Some(SELF_SIGNED_SECRET_TYPE.to_string()),
        data: Some(data),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            let loaded = check_secret(&created, namespace)?;
            tracing::info!(secret = %format!("{namespace}/{SELF_SIGNED_SECRET}"), "generated a new root CA");
            Ok(loaded)
        }
        Err(e) if is_status(&e, 409) => {
            tracing::info!(
                secret = %format!("{namespace}/{SELF_SIGNED_SECRET}"),
                "another replica created the root first; using it"
            );
            let secret = get(SELF_SIGNED_SECRET).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "Secret {namespace}/{SELF_SIGNED_SECRET} already existed when creating it \
                     but is gone now"
                )
            })?;
            check_secret(&secret, namespace)
        }
        Err(e) => Err(anyhow::anyhow!(
            "creating Secret {namespace}/{SELF_SIGNED_SECRET} for the new root CA: {e}"
        )),
    }
}

/// One change the publisher reacts to.
enum Change {
    Namespace(Event<Namespace>),
    ConfigMap(Event<ConfigMap>),
    Error(&'static str, watcher::Error),
}

fn active(namespace: &Namespace) -> bool {
    namespace.metadata.deletion_timestamp.is_none()
        && namespace.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

fn holds_root(config_map: &ConfigMap, root_pem: &str) -> bool {
    config_map
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CONFIGMAP_KEY))
        .is_some_and(|v| v == root_pem)
}

/// Makes ConfigMap `istio-ca-root-cert` in `namespace` hold `root_pem`: creates it, or restores
/// its `root-cert.pem` with a merge patch (other keys are left alone). Never touches another
/// ConfigMap.
pub async fn ensure_root_configmap(
    client: &kube::Client,
    namespace: &str,
    root_pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        match api.get_opt(ROOT_CONFIGMAP).await? {
            Some(existing) if holds_root(&existing, root_pem) => return Ok(()),
            Some(_) => {
                let patch = serde_json::json!({"data": {ROOT_CONFIGMAP_KEY: root_pem}});
                match api
                    .patch(
                        ROOT_CONFIGMAP,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            namespace,
                            "restored the root in ConfigMap {ROOT_CONFIGMAP}"
                        );
                        return Ok(());
                    }
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => continue,
                    Err(e) => return Err(e),
                }
            }
            None => {
                let config_map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(ROOT_CONFIGMAP.to_string()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(
                            [("istio.io/config".to_string(), "true".to_string())]
                                .into_iter()
                                .collect(),
                        ),
                        ..Default::default()
                    },
                    data: Some(
                        [(ROOT_CONFIGMAP_KEY.to_string(), root_pem.to_string())]
                            .into_iter()
                            .collect(),
                    ),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &config_map).await {
                    Ok(_) => {
                        tracing::info!(namespace, "created ConfigMap {ROOT_CONFIGMAP}");
                        return Ok(());
                    }
                    Err(e) if is_status(&e, 409) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Publishes `root_pem` as ConfigMap `istio-ca-root-cert` in every namespace, forever: for
/// namespaces that exist and those created later, restoring it when it is deleted or edited
/// (it watches namespaces and those ConfigMaps only). Failed writes are retried with backoff.
pub async fn publish_root(client: kube::Client, root_pem: String) {
    let namespaces = watcher::watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed()
    .map(|e| match e {
        Ok(e) => Change::Namespace(e),
        Err(e) => Change::Error("Namespace", e),
    });
    let config_maps = watcher::watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}")),
    )
    .default_backoff()
    .boxed()
    .map(|e| match e {
        Ok(e) => Change::ConfigMap(e),
        Err(e) => Change::Error("ConfigMap", e),
    });
    let mut changes = futures::stream::select(namespaces, config_maps);

    // Namespace → whether ConfigMaps may be written there (not terminating).
    let mut known: HashMap<String, bool> = HashMap::new();
    let mut listing: Option<HashMap<String, bool>> = None;
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut backoff = Duration::from_millis(250);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            change = changes.next() => match change {
                None => return,
                Some(Change::Namespace(event)) => match event {
                    Event::Init => listing = Some(HashMap::new()),
                    Event::InitApply(ns) => {
                        listing.get_or_insert_default().insert(ns.name_any(), active(&ns));
                    }
                    Event::InitDone => {
                        known = listing.take().unwrap_or_default();
                        pending.extend(known.keys().cloned());
                    }
                    Event::Apply(ns) => {
                        known.insert(ns.name_any(), active(&ns));
                        pending.insert(ns.name_any());
                    }
                    Event::Delete(ns) => {
                        known.remove(&ns.name_any());
                    }
                },
                Some(Change::ConfigMap(event)) => match event {
                    Event::InitApply(cm) | Event::Apply(cm) => {
                        if !holds_root(&cm, &root_pem) {
                            pending.insert(cm.namespace().unwrap_or_default());
                        }
                    }
                    Event::Delete(cm) => {
                        pending.insert(cm.namespace().unwrap_or_default());
                    }
                    // After a relist, deletions missed meanwhile are found by checking all.
                    Event::InitDone => pending.extend(known.keys().cloned()),
                    Event::Init => {}
                },
                Some(Change::Error(kind, error)) => {
                    tracing::warn!(kind, %error, "watch for the root ConfigMaps failed; retrying");
                }
            },
            () = retry => {
                retry_at = None;
                pending.append(&mut failed);
            }
        }
        while let Some(namespace) = pending.pop_first() {
            if known.get(&namespace) != Some(&true) {
                continue;
            }
            match ensure_root_configmap(&client, &namespace, &root_pem).await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                }
                Err(error) => {
                    tracing::warn!(namespace, %error, retry_in = ?backoff, "cannot publish the root ConfigMap {ROOT_CONFIGMAP}");
                    failed.insert(namespace);
                }
            }
        }
        if !failed.is_empty() && retry_at.is_none() {
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Where the CA and callers' credentials come from (the command line's choices).
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// `--ca-dir`: keep the CA in this directory (always, also in Kubernetes mode).
    pub ca_dir: Option<std::path::PathBuf>,
    /// `--tokens`: authenticate callers from this file instead of TokenReview.
    pub tokens: Option<std::path::PathBuf>,
    /// `--system-namespace`: where the CA's Secrets live.
    pub system_namespace: String,
    /// `--trust-domain`: of a generated root.
    pub trust_domain: String,
}

/// The CA, the root workloads trust, and the authenticator, as chosen by [`setup`].
#[derive(Debug)]
pub struct CaSetup {
    /// The signer.
    pub ca: std::sync::Arc<ambit_identity::ca::CertificateAuthority>,
    /// The root bundle workloads trust.
    pub root_pem: String,
    /// Who may call the CA and xDS.
    pub auth: crate::auth::Authenticator,
    /// The task publishing the root ConfigMaps (Kubernetes mode).
    pub publisher: Option<tokio::task::JoinHandle<()>>,
}

/// Sets up the CA for the mode istiod-lite runs in. With a Kubernetes client: the CA in Secrets
/// unless `--ca-dir` is given, TokenReview unless `--tokens` is given, and the root published to
/// every namespace (spawned). Without one, `--ca-dir` and `--tokens` are required.
pub async fn setup(
    kube: Option<&kube::Client>,
    options: &CaOptions,
    store: &crate::store::Store,
) -> anyhow::Result<CaSetup> {
    use crate::auth::{TokenFileAuthenticator, TokenReviewAuthenticator, TokenReviewConfig};
    let loaded = match (&options.ca_dir, kube) {
        (Some(dir), _) => ca::load_or_create_dir(dir, &options.trust_domain)?,
        (None, Some(client)) => {
            load_or_create_in_secrets(
                client.clone(),
                &options.system_namespace,
                &options.trust_domain,
            )
            .await?
        }
        (None, None) => {
            anyhow::bail!("--ca-dir is required unless istiod-lite runs in Kubernetes mode")
        }
    };
    let auth = match (&options.tokens, kube) {
        (Some(path), _) => TokenFileAuthenticator::new(path.clone()).into(),
        (None, Some(client)) => TokenReviewAuthenticator::new(
            client.clone(),
            store.clone(),
            TokenReviewConfig::default(),
        )
        .into(),
        (None, None) => {
            anyhow::bail!("--tokens is required unless istiod-lite runs in Kubernetes mode")
        }
    };
    let publisher =
        kube.map(|client| tokio::spawn(publish_root(client.clone(), loaded.root_pem.clone())));
    Ok(CaSetup {
        ca: std::sync::Arc::new(loaded.ca),
        root_pem: loaded.root_pem,
        auth,
        publisher,
    })
}
