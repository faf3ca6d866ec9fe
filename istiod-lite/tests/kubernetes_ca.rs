//! istiod-lite's CA in Kubernetes against the scripted API server: the root kept in Secrets
//! (`istio-ca-secret` created once and reused, the operator's `cacerts` checked and used), the
//! root ConfigMap in every namespace, TokenReview authentication and strict authorization; and
//! in directory mode, an operator's files left untouched.

mod support;
use support::eventually;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_fake_apiserver::FakeApiServer;
use ambit_identity::Identity;
use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::ca::IstioCertificateRequest;
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateService;
use istiod_lite::auth::{TokenReviewAuthenticator, TokenReviewConfig};
use istiod_lite::ca::{CaService, default_trusted_node_accounts, load_or_create_dir};
use istiod_lite::kube_ca::{
    CACERTS_SECRET, CaOptions, ROOT_CONFIGMAP, SELF_SIGNED_SECRET, load_or_create_in_secrets,
    publish_root,
};
use istiod_lite::store::Store;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

const NS: &str = "istio-system";

/// An operator's CA: a root and an intermediate signed by it (the intermediate signs workloads).
struct OperatorCa {
    root_pem: String,
    ca_cert_pem: String,
    ca_key_pem: String,
}

fn ca_params(org: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn operator_ca(name: &str) -> OperatorCa {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_params = ca_params(&format!("{name} root"));
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root_params, root_key);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = ca_params(&format!("{name} intermediate"))
        .signed_by(&ca_key, &issuer)
        .unwrap();
    OperatorCa {
        root_pem: root.pem(),
        ca_cert_pem: ca.pem(),
        ca_key_pem: ca_key.serialize_pem(),
    }
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

/// Each entry of `chain` is signed by the next; the last is `root`.
fn assert_chains_to(chain: &[String], root: &str) {
    assert_eq!(chain.last().map(String::as_str), Some(root), "root last");
    let ders: Vec<Vec<u8>> = chain.iter().map(|c| der(c)).collect();
    for pair in ders.windows(2) {
        let (_, child) = X509Certificate::from_der(&pair[0]).unwrap();
        let (_, parent) = X509Certificate::from_der(&pair[1]).unwrap();
        child
            .verify_signature(Some(parent.public_key()))
            .unwrap_or_else(|e| {
                panic!(
                    "{} not signed by {}: {e}",
                    child.subject(),
                    parent.subject()
                )
            });
    }
}

fn secret_data(object: &Value, key: &str) -> String {
    use std::io::Read as _;
    let encoded = object["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret has no {key}: {object}"));
    // Minimal base64 decoding through the k8s-openapi ByteString type.
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(Value::String(encoded.to_string())).unwrap();
    let mut text = String::new();
    bytes.0.as_slice().read_to_string(&mut text).unwrap();
    text
}

fn b64(text: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).unwrap()
}

fn cacerts(ca: &OperatorCa, key_pem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CACERTS_SECRET, "namespace": NS},
        "data": {
            "ca-cert.pem": b64(&ca.ca_cert_pem),
            "ca-key.pem": b64(key_pem),
            "cert-chain.pem": b64(&format!("{}{}", ca.ca_cert_pem, ca.root_pem)),
            "root-cert.pem": b64(&ca.root_pem),
        },
    })
}

#[tokio::test]
async fn first_start_creates_istio_ca_secret_and_later_starts_reuse_it() {
    let server = FakeApiServer::start().await;
    let client = support::kube_client(&server).await;
    let first = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap();
    let stored = server
        .get("v1", "Secret", NS, SELF_SIGNED_SECRET)
        .expect("istio-ca-secret created");
    assert_eq!(stored["type"], "istio.io/ca-root");
    assert_eq!(secret_data(&stored, "root-cert.pem"), first.root_pem);
    assert_eq!(secret_data(&stored, "ca-cert.pem"), first.ca.cert_pem());
    assert!(secret_data(&stored, "ca-key.pem").contains("PRIVATE KEY"));

    let second = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap();
    assert_eq!(second.root_pem, first.root_pem, "the same root on restart");
    assert_eq!(second.ca.key_pem(), first.ca.key_pem());

    // Another replica created it between our read and our create: 409, then the stored one.
    server.fail_next(
        "GET",
        &format!("/api/v1/namespaces/{NS}/secrets/{SELF_SIGNED_SECRET}"),
        404,
    );
    let raced = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap();
    assert_eq!(
        raced.root_pem, first.root_pem,
        "the stored root wins a race"
    );
    let posts = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/secrets"))
        .count();
    assert_eq!(posts, 2, "created once, and once more in the race (409)");
    assert_eq!(server.list("v1", "Secret").len(), 1);
}

#[tokio::test]
async fn cacerts_is_used_and_leaves_chain_to_the_operators_root() {
    let server = FakeApiServer::start().await;
    let ca = operator_ca("operator");
    server.apply(cacerts(&ca, &ca.ca_key_pem));
    let loaded =
        load_or_create_in_secrets(support::kube_client(&server).await, NS, "cluster.local")
            .await
            .unwrap();
    assert_eq!(loaded.root_pem, ca.root_pem, "workloads get root-cert.pem");
    assert!(
        server.get("v1", "Secret", NS, SELF_SIGNED_SECRET).is_none(),
        "no self-signed root when cacerts exists"
    );
    let web = Identity::new("cluster.local", "demo", "web").unwrap();
    let request = ambit_identity::csr::generate(&web).unwrap();
    let chain = loaded
        .ca
        .sign_csr(&request.csr_pem, &web, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root: {chain:?}");
    assert_eq!(chain[1], ca.ca_cert_pem);
    assert_chains_to(&chain, &ca.root_pem);
}

#[tokio::test]
async fn cacerts_that_do_not_fit_together_are_refused_naming_the_key() {
    let server = FakeApiServer::start().await;
    let client = support::kube_client(&server).await;
    let ca = operator_ca("operator");
    let other = operator_ca("other");
    server.apply(cacerts(&ca, &other.ca_key_pem));
    let error = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Secret istio-system/cacerts key ca-key.pem does not match"),
        "{error}"
    );

    // A root that did not sign the chain.
    let mut secret = cacerts(&ca, &ca.ca_key_pem);
    secret["data"]["root-cert.pem"] = b64(&other.root_pem);
    secret["data"]["cert-chain.pem"] = b64(&ca.ca_cert_pem);
    server.apply(secret);
    let error = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(
            "Secret istio-system/cacerts key ca-cert.pem does not chain to Secret \
             istio-system/cacerts key root-cert.pem"
        ),
        "{error}"
    );

    // A leaf certificate is no CA.
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName("x.example".try_into().unwrap())];
    let leaf = params.self_signed(&leaf_key).unwrap();
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CACERTS_SECRET, "namespace": NS},
        "data": {
            "ca-cert.pem": b64(&leaf.pem()),
            "ca-key.pem": b64(&leaf_key.serialize_pem()),
            "root-cert.pem": b64(&leaf.pem()),
        },
    }));
    let error = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Secret istio-system/cacerts key ca-cert.pem")
            && error.contains("not allowed to sign"),
        "{error}"
    );

    // A missing key.
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CACERTS_SECRET, "namespace": NS},
        "data": {"ca-cert.pem": b64(&ca.ca_cert_pem), "root-cert.pem": b64(&ca.root_pem)},
    }));
    let error = load_or_create_in_secrets(client, NS, "cluster.local")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Secret istio-system/cacerts: key ca-key.pem is missing"),
        "{error}"
    );
    assert!(server.get("v1", "Secret", NS, SELF_SIGNED_SECRET).is_none());
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn root_in(server: &FakeApiServer, ns: &str) -> Option<String> {
    server
        .get("v1", "ConfigMap", ns, ROOT_CONFIGMAP)
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_string))
}

#[tokio::test]
async fn the_root_configmap_is_in_every_namespace_and_comes_back() {
    let server = FakeApiServer::start().await;
    for ns in ["istio-system", "demo"] {
        server.apply(namespace(ns));
    }
    let unrelated = server.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app-settings", "namespace": "demo"},
        "data": {"root-cert.pem": "not ours"},
    }));
    let root = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n".to_string();
    let task = tokio::spawn(publish_root(
        support::kube_client(&server).await,
        root.clone(),
    ));

    eventually("published in existing namespaces", || {
        root_in(&server, "istio-system").as_ref() == Some(&root)
            && root_in(&server, "demo").as_ref() == Some(&root)
    })
    .await;
    let created = server
        .get("v1", "ConfigMap", "demo", ROOT_CONFIGMAP)
        .unwrap();
    assert_eq!(created["metadata"]["labels"]["istio.io/config"], "true");

    server.apply(namespace("later"));
    eventually("published in a namespace created later", || {
        root_in(&server, "later").as_ref() == Some(&root)
    })
    .await;

    assert!(server.delete("v1", "ConfigMap", "demo", ROOT_CONFIGMAP));
    eventually("recreated after deletion", || {
        root_in(&server, "demo").as_ref() == Some(&root)
    })
    .await;

    server.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": "later"},
        "data": {"root-cert.pem": "tampered"},
    }));
    eventually("restored after an edit", || {
        root_in(&server, "later").as_ref() == Some(&root)
    })
    .await;

    let now = server
        .get("v1", "ConfigMap", "demo", "app-settings")
        .unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"], unrelated["metadata"]["resourceVersion"],
        "other ConfigMaps are never touched"
    );
    assert_eq!(now["data"]["root-cert.pem"], "not ours");
    let writes_elsewhere = server
        .requests()
        .iter()
        .filter(|r| r.method != "GET" && !r.path.ends_with(ROOT_CONFIGMAP))
        .filter(|r| !(r.method == "POST" && r.path.ends_with("/configmaps")))
        .count();
    assert_eq!(writes_elsewhere, 0, "{:?}", server.requests());
    task.abort();
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-a, namespace: istio-system, uid: uid-zt-a}
spec: {nodeName: node-1, serviceAccountName: ztunnel}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-b, namespace: istio-system, uid: uid-zt-b}
spec: {nodeName: node-2, serviceAccountName: ztunnel}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, uid: uid-client}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, uid: uid-echo}
spec: {nodeName: node-2, serviceAccountName: echo}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default, uid: uid-legacy}
spec: {nodeName: node-1, serviceAccountName: legacy}
"#;

/// An RSA 1024 CSR for spiffe://cluster.local/ns/default/sa/legacy (the identity crate's fixture).
const RSA_1024_CSR: &str = include_str!("../../crates/identity/tests/fixtures/rsa1024.csr.pem");

/// A TokenReview answer for `token`, as an API server would give it.
fn review(token: &str) -> Result<Value, (u16, String)> {
    let user = |name: &str, extra: Value| {
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": name, "uid": "u", "extra": extra}})
    };
    let zt = "system:serviceaccount:istio-system:ztunnel";
    let status = match token {
        "zt-node-1" => user(
            zt,
            json!({"authentication.kubernetes.io/pod-name": ["ztunnel-a"],
                   "authentication.kubernetes.io/pod-uid": ["uid-zt-a"]}),
        ),
        "zt-node-2-by-extra" => user(
            zt,
            json!({"authentication.kubernetes.io/node-name": ["node-2"],
                   "authentication.kubernetes.io/pod-name": ["ztunnel-b"],
                   "authentication.kubernetes.io/pod-uid": ["uid-zt-b"]}),
        ),
        "zt-gone" => user(
            zt,
            json!({"authentication.kubernetes.io/pod-name": ["ztunnel-z"],
                   "authentication.kubernetes.io/pod-uid": ["uid-zt-z"]}),
        ),
        "client-own" => user(
            "system:serviceaccount:demo:client",
            json!({"authentication.kubernetes.io/pod-name": ["client"],
                   "authentication.kubernetes.io/pod-uid": ["uid-client"],
                   "authentication.kubernetes.io/node-name": ["node-1"]}),
        ),
        "other-audience" => {
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                                   "user": {"username": zt}})
        }
        "admin" => user("kubernetes-admin", json!({})),
        "api-down" => return Err((500, "etcdserver: request timed out".to_string())),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "metadata": {"creationTimestamp": null}, "status": status,
    }))
}

/// A store holding [`PODS`], as the config source would fill it.
fn store_with_pods() -> Store {
    let store = Store::new();
    let (objects, errors) = parse_documents(PODS, "pods.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let cluster = Cluster::from_objects(objects);
    let resources = translate(&cluster, &MeshSettings::default());
    store.replace(cluster, &resources);
    store
}

struct Cluster1 {
    server: FakeApiServer,
    ca: CaService,
    root: String,
    metrics: Registry,
    auth: TokenReviewAuthenticator,
    reviewed: Arc<Mutex<Vec<Value>>>,
}

async fn cluster() -> Cluster1 {
    let server = FakeApiServer::start().await;
    let reviewed = Arc::new(Mutex::new(Vec::new()));
    {
        let reviewed = reviewed.clone();
        server.on_create("tokenreviews", move |request: Value| {
            reviewed.lock().unwrap().push(request["spec"].clone());
            review(request["spec"]["token"].as_str().unwrap_or(""))
        });
    }
    let client = support::kube_client(&server).await;
    let loaded = load_or_create_in_secrets(client.clone(), NS, "cluster.local")
        .await
        .unwrap();
    let store = store_with_pods();
    let metrics = Registry::new();
    let auth = TokenReviewAuthenticator::new(client, store.clone(), TokenReviewConfig::default());
    let ca = CaService {
        ca: Arc::new(loaded.ca),
        store,
        auth: auth.clone().into(),
        trusted_node_accounts: default_trusted_node_accounts(),
        trust_domain: "cluster.local".into(),
        default_ttl: Duration::from_secs(24 * 3600),
        max_ttl: Duration::from_secs(48 * 3600),
        metrics: metrics.clone(),
    };
    Cluster1 {
        server,
        ca,
        root: loaded.root_pem,
        metrics,
        auth,
        reviewed,
    }
}

fn request(
    token: &str,
    csr: &str,
    impersonate: Option<&Identity>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: ttl,
        metadata: impersonate.map(|id| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        }),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn csr(identity: &Identity) -> String {
    ambit_identity::csr::generate(identity).unwrap().csr_pem
}

async fn refused(
    c: &Cluster1,
    token: &str,
    csr: &str,
    impersonate: Option<&Identity>,
) -> tonic::Status {
    c.ca.create_certificate(request(token, csr, impersonate, 3600))
        .await
        .expect_err("refused")
}

/// The leaf's lifetime in seconds and its SANs.
fn leaf(chain: &[String]) -> (i64, String) {
    let der = der(&chain[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let validity = cert.validity();
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    (
        validity.not_after.timestamp() - validity.not_before.timestamp(),
        sans,
    )
}

#[tokio::test]
async fn a_ztunnel_token_obtains_identities_of_pods_on_its_node_only() {
    let c = cluster().await;
    let client = id("demo", "client");
    let chain =
        c.ca.create_certificate(request("zt-node-1", &csr(&client), Some(&client), 0))
            .await
            .expect("client runs on node-1, the ztunnel's node")
            .into_inner()
            .cert_chain;
    assert_chains_to(&chain, &c.root);
    let (lifetime, sans) = leaf(&chain);
    assert_eq!(lifetime, 24 * 3600, "default lifetime 24h");
    assert!(
        sans.contains("spiffe://cluster.local/ns/demo/sa/client"),
        "{sans}"
    );

    // Lifetimes are capped.
    let chain =
        c.ca.create_certificate(request(
            "zt-node-1",
            &csr(&client),
            Some(&client),
            30 * 86400,
        ))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(leaf(&chain).0, 48 * 3600, "capped at --max-ttl");

    let echo = id("demo", "echo");
    let status = refused(&c, "zt-node-1", &csr(&echo), Some(&echo)).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("no pod with service account demo/echo runs on node node-1"),
        "{}",
        status.message()
    );

    // The node-name extra names the node directly.
    c.ca.create_certificate(request("zt-node-2-by-extra", &csr(&echo), Some(&echo), 0))
        .await
        .expect("echo runs on node-2");
    let status = refused(&c, "zt-node-2-by-extra", &csr(&client), Some(&client)).await;
    assert!(
        status.message().contains("node node-2"),
        "{}",
        status.message()
    );

    // Every review asked for audience istio-ca; positive reviews are cached.
    let reviews = c.reviewed.lock().unwrap().clone();
    assert!(
        reviews
            .iter()
            .all(|spec| spec["audiences"] == json!(["istio-ca"])),
        "{reviews:?}"
    );
    assert_eq!(reviews.len(), 2, "one review per token: {reviews:?}");
    assert_eq!(c.auth.cached(), 2);
    let posts = c
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("tokenreviews"))
        .count();
    assert_eq!(posts, 2);

    let text = c.metrics.render();
    assert!(text.contains("ambit_ca_signed_total 3"), "{text}");
    assert!(
        text.contains("ambit_ca_refused_total{reason=\"not-on-node\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_workload_gets_its_own_identity_and_may_not_impersonate() {
    let c = cluster().await;
    let client = id("demo", "client");
    let chain =
        c.ca.create_certificate(request("client-own", &csr(&client), None, 3600))
            .await
            .expect("own identity without ImpersonatedIdentity")
            .into_inner()
            .cert_chain;
    assert_chains_to(&chain, &c.root);

    // Its own identity only: a CSR for another name is refused.
    let echo = id("demo", "echo");
    let status = refused(&c, "client-own", &csr(&echo), None).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains(
            "CSR asks for spiffe://cluster.local/ns/demo/sa/echo but the caller is authorized \
             for spiffe://cluster.local/ns/demo/sa/client"
        ),
        "{}",
        status.message()
    );

    // Impersonation by a non-ztunnel account, even of a pod on its own node.
    let status = refused(&c, "client-own", &csr(&client), Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("caller demo/client may not ask for ImpersonatedIdentity"),
        "{}",
        status.message()
    );

    let text = c.metrics.render();
    for reason in ["san-mismatch", "impersonation-not-allowed"] {
        assert!(
            text.contains(&format!("ambit_ca_refused_total{{reason=\"{reason}\"}} 1")),
            "{reason}: {text}"
        );
    }
}

#[tokio::test]
async fn bad_tokens_and_bad_csrs_are_refused_with_their_reasons() {
    let c = cluster().await;
    let client = id("demo", "client");
    let good = csr(&client);

    let status = refused(&c, "who-knows", &good, Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("invalid bearer token"),
        "{}",
        status.message()
    );

    let status = refused(&c, "other-audience", &good, Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("not for audience istio-ca"),
        "{}",
        status.message()
    );

    let status = refused(&c, "admin", &good, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("not a service account"),
        "{}",
        status.message()
    );

    let status = refused(&c, "zt-gone", &good, Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status
            .message()
            .contains("pod istio-system/ztunnel-z (uid uid-zt-z) which does not exist"),
        "{}",
        status.message()
    );

    let status = refused(&c, "api-down", &good, Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("etcdserver: request timed out"),
        "{}",
        status.message()
    );

    // A key we do not issue for (Ed25519), with the right SAN.
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(client.to_string().try_into().unwrap())];
    let weak = params.serialize_request(&key).unwrap().pem().unwrap();
    let status = refused(&c, "zt-node-1", &weak, Some(&client)).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("unsupported key"),
        "{}",
        status.message()
    );

    // A weak key: RSA 1024, for a pod on the ztunnel's node.
    let legacy = id("default", "legacy");
    let status = refused(&c, "zt-node-1", RSA_1024_CSR, Some(&legacy)).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("RSA 1024 bits"),
        "{}",
        status.message()
    );

    // SAN of another pod on the same node.
    let status = refused(&c, "zt-node-1", &csr(&id("demo", "other")), Some(&client)).await;
    assert!(
        status.message().contains("CSR asks for"),
        "{}",
        status.message()
    );

    assert_eq!(
        c.auth.cached(),
        2,
        "only positive reviews are cached (zt-gone's pod is checked on every call)"
    );
    let text = c.metrics.render();
    for reason in [
        "unknown-token",
        "wrong-audience",
        "not-service-account",
        "caller-pod-missing",
        "token-review-failed",
        "san-mismatch",
    ] {
        assert!(
            text.contains(&format!("ambit_ca_refused_total{{reason=\"{reason}\"}} 1")),
            "{reason}: {text}"
        );
    }
    assert!(
        text.contains("ambit_ca_refused_total{reason=\"weak-key\"} 2"),
        "{text}"
    );
    assert!(!text.contains("ambit_ca_signed_total 1"), "{text}");
}

#[test]
fn directory_mode_never_rewrites_an_operators_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = operator_ca("operator");
    let files = [
        ("ca-cert.pem", ca.ca_cert_pem.clone()),
        ("ca-key.pem", ca.ca_key_pem.clone()),
        (
            "cert-chain.pem",
            format!("{}{}", ca.ca_cert_pem, ca.root_pem),
        ),
        ("root-cert.pem", ca.root_pem.clone()),
    ];
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let before: Vec<_> = files
        .iter()
        .map(|(name, _)| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let loaded = load_or_create_dir(dir.path(), "cluster.local").unwrap();
    assert_eq!(loaded.root_pem, ca.root_pem);
    for ((name, text), modified) in files.iter().zip(before) {
        let path = dir.path().join(name);
        assert_eq!(
            &std::fs::read_to_string(&path).unwrap(),
            text,
            "{name} unchanged"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified,
            "{name}"
        );
    }

    // Without root-cert.pem, the root is the chain's self-signed top, written once.
    std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
    let loaded = load_or_create_dir(dir.path(), "cluster.local").unwrap();
    assert_eq!(loaded.root_pem, ca.root_pem);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap(),
        ca.root_pem
    );

    // A root that does not fit is an error naming the file, and nothing is written.
    let other = operator_ca("other");
    std::fs::write(dir.path().join("root-cert.pem"), &other.root_pem).unwrap();
    std::fs::write(dir.path().join("cert-chain.pem"), &ca.ca_cert_pem).unwrap();
    let error = load_or_create_dir(dir.path(), "cluster.local")
        .unwrap_err()
        .to_string();
    let root_path = dir.path().join("root-cert.pem").display().to_string();
    assert!(
        error.contains(&format!("does not chain to {root_path}")),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("root-cert.pem")).unwrap(),
        other.root_pem
    );

    // Only one of the pair: refused, never generated over.
    let half = tempfile::tempdir().unwrap();
    std::fs::write(half.path().join("ca-cert.pem"), &ca.ca_cert_pem).unwrap();
    let error = load_or_create_dir(half.path(), "cluster.local")
        .unwrap_err()
        .to_string();
    assert!(error.contains("ca-key.pem does not"), "{error}");
    assert_eq!(std::fs::read_dir(half.path()).unwrap().count(), 1);
}

#[test]
fn directory_mode_generates_once_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create_dir(&dir.path().join("ca"), "cluster.local").unwrap();
    let second = load_or_create_dir(&dir.path().join("ca"), "cluster.local").unwrap();
    assert_eq!(first.root_pem, second.root_pem);
    assert_eq!(first.ca.key_pem(), second.ca.key_pem());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("ca/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap(),
        first.root_pem
    );
}

#[tokio::test]
async fn kubernetes_mode_keeps_the_ca_in_secrets_reviews_tokens_and_publishes_the_root() {
    let server = FakeApiServer::start().await;
    server.on_create("tokenreviews", |request: Value| {
        review(request["spec"]["token"].as_str().unwrap_or(""))
    });
    server.apply(namespace("demo"));
    let client = support::kube_client(&server).await;
    let store = store_with_pods();
    let options = CaOptions {
        ca_dir: None,
        tokens: None,
        system_namespace: NS.into(),
        trust_domain: "cluster.local".into(),
    };
    let setup = istiod_lite::kube_ca::setup(Some(&client), &options, &store)
        .await
        .unwrap();
    let stored = server
        .get("v1", "Secret", NS, SELF_SIGNED_SECRET)
        .expect("the root is kept in istio-ca-secret");
    assert_eq!(secret_data(&stored, "root-cert.pem"), setup.root_pem);
    eventually("root published", || {
        root_in(&server, "demo").as_ref() == Some(&setup.root_pem)
    })
    .await;
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", "Bearer client-own".parse().unwrap());
    let caller = setup.auth.authenticate(&metadata).await.unwrap();
    assert_eq!(
        caller.account(),
        "demo/client",
        "authenticated by TokenReview"
    );
    assert_eq!(caller.node.as_deref(), Some("node-1"));
    if let Some(task) = setup.publisher {
        task.abort();
    }

    // --ca-dir and --tokens win over Kubernetes.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.json"),
        r#"{"tokens": [{"token": "t1", "node": "node-1"}]}"#,
    )
    .unwrap();
    let options = CaOptions {
        ca_dir: Some(dir.path().join("ca")),
        tokens: Some(dir.path().join("tokens.json")),
        ..options
    };
    let setup = istiod_lite::kube_ca::setup(Some(&client), &options, &store)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap(),
        setup.root_pem
    );
    assert_ne!(secret_data(&stored, "root-cert.pem"), setup.root_pem);
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", "Bearer t1".parse().unwrap());
    let caller = setup.auth.authenticate(&metadata).await.unwrap();
    assert_eq!(caller.account(), "istio-system/ztunnel");
    if let Some(task) = setup.publisher {
        task.abort();
    }

    // Outside Kubernetes mode both are required.
    let error = istiod_lite::kube_ca::setup(
        None,
        &CaOptions {
            ca_dir: None,
            ..options.clone()
        },
        &store,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("--ca-dir is required"), "{error}");
}

#[test]
fn the_binary_without_kubernetes_needs_a_ca_dir() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
        .args(["--config-dir"])
        .arg(dir.path())
        .args(["--tokens"])
        .arg(dir.path().join("tokens.json"))
        .args(["--listen", "127.0.0.1:0", "--monitoring", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--ca-dir is required unless istiod-lite runs in Kubernetes mode"),
        "{stderr}"
    );
}

/// The whole path over TLS: ztunnel's own CA client, with a bound ztunnel token checked by
/// TokenReview, obtains a pod's certificate; xDS streams are authenticated the same way.
#[tokio::test]
async fn ztunnels_ca_client_gets_certificates_through_token_review_over_tls() {
    use ambit_identity::store::{CertStore, StoreConfig};
    use ambit_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
    use ambit_proto::discovery::DeltaDiscoveryRequest;
    use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use ambit_xds::CaClient;
    use tonic::transport::Server;

    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), &c.root).unwrap();
    let tls = support::serving_tls(&c.ca.ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let xds = istiod_lite::xds::XdsServer {
        store: c.ca.store.clone(),
        auth: c.ca.auth.clone(),
        metrics: c.metrics.clone(),
        debounce: Duration::from_millis(20),
        shutdown: Default::default(),
    };
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(IstioCertificateServiceServer::new(c.ca.clone()))
            .add_service(istiod_lite::xds::service(xds))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let control =
        |token: &str| support::control_plane(port, dir.path().join("root-cert.pem"), Some(token));
    let store = CertStore::new(
        Arc::new(CaClient::new(control("zt-node-1"), true)),
        StoreConfig {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            ..StoreConfig::default()
        },
    );
    let client = id("demo", "client");
    let cert = tokio::time::timeout(Duration::from_secs(10), store.get(&client))
        .await
        .expect("in time")
        .expect("a pod with this account runs on node-1");
    assert_eq!(cert.identity(), &client);
    let echo = id("demo", "echo");
    let refused = tokio::time::timeout(Duration::from_secs(10), store.get(&echo))
        .await
        .expect("in time")
        .unwrap_err()
        .to_string();
    assert!(refused.contains("runs on node node-1"), "{refused}");

    // xDS: a reviewed token opens a stream; an unknown one is refused by TokenReview.
    let channel = control("zt-node-1").connect().await.unwrap();
    let mut raw = AggregatedDiscoveryServiceClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![DeltaDiscoveryRequest {
        type_url: ambit_proto::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    }]));
    request
        .metadata_mut()
        .insert("authorization", "Bearer zt-node-1".parse().unwrap());
    let mut responses = raw
        .delta_aggregated_resources(request)
        .await
        .expect("authenticated")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("in time")
        .unwrap()
        .expect("a response");
    assert_eq!(first.type_url, ambit_proto::ADDRESS_TYPE_URL);
    let mut request = tonic::Request::new(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()));
    request
        .metadata_mut()
        .insert("authorization", "Bearer forged".parse().unwrap());
    let status = raw.delta_aggregated_resources(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("invalid bearer token"),
        "{}",
        status.message()
    );
    server.abort();
}

#[test]
fn the_binary_refuses_a_malformed_trusted_node_account() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
        .args(["--config-dir", "/nonexistent", "--trusted-node-accounts"])
        .arg("istio-system/ztunnel,ztunnel")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("trusted node account \"ztunnel\" is not `namespace/service-account`"),
        "{stderr}"
    );
}
