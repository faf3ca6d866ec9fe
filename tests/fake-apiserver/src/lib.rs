//! A scripted Kubernetes API server for tests.
//!
//! [`FakeApiServer`] speaks the API server's list/watch wire format over plain HTTP/1.1 on
//! loopback, closely enough that kube-rs clients and watchers work against it unmodified:
//! collections and single objects under `/api/v1` and `/apis/{group}/{version}`, one global
//! resourceVersion counter (as etcd), watches that replay history from a resourceVersion and then
//! stream live events, label and field selectors, `410 Gone` after compaction (sent in the watch
//! stream, as real servers do), optimistic concurrency on updates, merge patches, server-side
//! apply (per field manager: fields a manager stops applying are removed), status subresources
//! (writes to `.../status` change only `status`), `metadata.generation` (bumped when anything but
//! metadata and status changes), garbage collection of dependents through `ownerReferences`, and
//! `Status` errors. Tests script it directly ([`FakeApiServer::apply`], [`FakeApiServer::delete`],
//! [`FakeApiServer::drop_watches`], [`FakeApiServer::compact`], [`FakeApiServer::fail_next`]) and
//! inspect what clients asked ([`FakeApiServer::requests`]).

mod selector;
mod time;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use selector::{FieldSelector, LabelSelector};

type Body = BoxBody<Bytes, Infallible>;
/// (apiVersion, kind, namespace, name).
type Key = (String, String, String, String);
type CreateHandler = Arc<dyn Fn(Value) -> Result<Value, (u16, String)> + Send + Sync + 'static>;

/// Handle to a running fake API server (cheap to clone; the server stops when the last handle
/// drops).
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    _guard: Arc<StopGuard>,
    url: String,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A kind the server serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// `v1`, `apps/v1`, `security.istio.io/v1`, ...
    pub api_version: String,
    /// `Pod`, `AuthorizationPolicy`, ...
    pub kind: String,
    /// The resource name in paths: `pods`, `authorizationpolicies`, ...
    pub plural: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
}

impl KindInfo {
    /// Shorthand constructor.
    pub fn new(api_version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        KindInfo {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
        }
    }
}

/// One request the server received, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: BTreeMap<String, String>,
    /// Whether this was a watch (`watch=true` or `watch=1`).
    pub watch: bool,
}

/// Aborts the accept loop (and with it every connection) when the last handle drops.
struct StopGuard(tokio::task::JoinHandle<()>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, kept for watches that resume from an older resourceVersion.
struct HistoryEvent {
    rv: u64,
    kind: (String, String),
    kind_type: EventType,
    /// The object before the change (for MODIFIED), to translate selector transitions.
    old: Option<Value>,
    /// The object after the change (for DELETED: the last state with a new resourceVersion).
    object: Value,
}

struct Watcher {
    path: String,
    filter: Filter,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// What one list or watch selects.
struct Filter {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str().unwrap_or("") != ns
        {
            return false;
        }
        if let Some(name) = &self.name
            && meta["name"].as_str().unwrap_or("") != name
        {
            return false;
        }
        self.labels.matches(&meta["labels"]) && self.fields.matches(object)
    }
}

struct FailRule {
    method: String,
    path_prefix: String,
    code: u16,
}

struct State {
    kinds: Vec<KindInfo>,
    /// Stored objects (with apiVersion and kind) by (apiVersion, kind, namespace, name).
    objects: BTreeMap<(String, String, String, String), Value>,
    resource_version: u64,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    history: Vec<HistoryEvent>,
    watchers: Vec<Watcher>,
    requests: Vec<RecordedRequest>,
    fail_rules: Vec<FailRule>,
    create_handlers: HashMap<String, CreateHandler>,
    /// What each field manager last applied (server-side apply), by object key and manager.
    applied: HashMap<(Key, String), Value>,
}

impl Default for State {
    fn default() -> Self {
        let kinds = [
            ("v1", "Namespace", "namespaces", false),
            ("v1", "Pod", "pods", true),
            ("v1", "Service", "services", true),
            ("v1", "Node", "nodes", false),
            ("v1", "Secret", "secrets", true),
            ("v1", "ConfigMap", "configmaps", true),
            ("v1", "ServiceAccount", "serviceaccounts", true),
            (
                "discovery.k8s.io/v1",
                "EndpointSlice",
                "endpointslices",
                true,
            ),
            (
                "security.istio.io/v1",
                "AuthorizationPolicy",
                "authorizationpolicies",
                true,
            ),
            (
                "security.istio.io/v1",
                "PeerAuthentication",
                "peerauthentications",
                true,
            ),
            ("gateway.networking.k8s.io/v1", "Gateway", "gateways", true),
            (
                "gateway.networking.k8s.io/v1",
                "GatewayClass",
                "gatewayclasses",
                false,
            ),
            (
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                "httproutes",
                true,
            ),
            (
                "gateway.networking.k8s.io/v1",
                "GRPCRoute",
                "grpcroutes",
                true,
            ),
            (
                "networking.istio.io/v1",
                "DestinationRule",
                "destinationrules",
                true,
            ),
            ("apps/v1", "Deployment", "deployments", true),
            (
                "authentication.k8s.io/v1",
                "TokenReview",
                "tokenreviews",
                false,
            ),
        ]
        .into_iter()
        .map(|(a, k, p, n)| KindInfo::new(a, k, p, n))
        .collect();
        State {
            kinds,
            objects: BTreeMap::new(),
            resource_version: 1000,
            compacted: 0,
            history: Vec::new(),
            watchers: Vec::new(),
            requests: Vec::new(),
            fail_rules: Vec::new(),
            create_handlers: HashMap::new(),
            applied: HashMap::new(),
        }
    }
}

impl State {
    fn kind_by_name(&self, api_version: &str, kind: &str) -> Option<&KindInfo> {
        self.kinds
            .iter()
            .find(|k| k.api_version == api_version && k.kind == kind)
    }

    fn kind_by_plural(&self, api_version: &str, plural: &str) -> Option<&KindInfo> {
        self.kinds
            .iter()
            .find(|k| k.api_version == api_version && k.plural == plural)
    }

    fn next_rv(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Stores `object` (which carries apiVersion, kind and metadata) as a create or a replace,
    /// stamping resourceVersion, uid and creationTimestamp, and emits the event.
    fn store(&mut self, mut object: Value) -> Value {
        let key = object_key(&object);
        let old = self.objects.get(&key).cloned();
        let rv = self.next_rv();
        let meta = metadata_mut(&mut object);
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        match &old {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), old["metadata"][field].clone());
                }
                let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                let bump = u64::from(spec_of(old) != spec_of(&object));
                metadata_mut(&mut object)
                    .insert("generation".into(), Value::from(generation + bump));
            }
            None => {
                meta.insert("uid".into(), Value::String(uid(rv)));
                meta.insert(
                    "creationTimestamp".into(),
                    Value::String(time::now_rfc3339()),
                );
                meta.insert("generation".into(), Value::from(1));
            }
        }
        let meta = metadata_mut(&mut object);
        if meta
            .get("namespace")
            .is_some_and(|n| n.as_str() == Some(""))
        {
            meta.remove("namespace");
        }
        self.objects.insert(key.clone(), object.clone());
        let kind_type = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(HistoryEvent {
            rv,
            kind: (key.0, key.1),
            kind_type,
            old,
            object: object.clone(),
        });
        object
    }

    /// Removes an object and then (as the garbage collector would) every object whose
    /// `ownerReferences` name it by uid.
    fn remove(&mut self, key: &(String, String, String, String)) -> Option<Value> {
        let removed = self.remove_one(key)?;
        let mut owners = vec![
            removed["metadata"]["uid"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ];
        // Bounded: every round removes at least one object or stops.
        while let Some(owner) = owners.pop() {
            let dependents: Vec<_> = self
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner.as_str()))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for dependent in dependents {
                if let Some(gone) = self.remove_one(&dependent) {
                    owners.push(gone["metadata"]["uid"].as_str().unwrap_or("").to_string());
                }
            }
        }
        Some(removed)
    }

    fn remove_one(&mut self, key: &(String, String, String, String)) -> Option<Value> {
        self.applied.retain(|(k, _), _| k != key);
        let mut object = self.objects.remove(key)?;
        let rv = self.next_rv();
        metadata_mut(&mut object).insert("resourceVersion".into(), Value::String(rv.to_string()));
        self.emit(HistoryEvent {
            rv,
            kind: (key.0.clone(), key.1.clone()),
            kind_type: EventType::Deleted,
            old: None,
            object: object.clone(),
        });
        Some(object)
    }

    fn emit(&mut self, event: HistoryEvent) {
        self.watchers.retain(|w| {
            if w.tx.is_closed() {
                return false;
            }
            if let Some(line) = event_line(&w.filter, &event) {
                let _ = w.tx.send(line);
            }
            true
        });
        self.history.push(event);
    }
}

/// The line a watch with `filter` sees for `event`, if any. A MODIFIED event that moves an
/// object into or out of the selection becomes ADDED or DELETED, as on a real server.
fn event_line(filter: &Filter, event: &HistoryEvent) -> Option<Bytes> {
    if (filter.api_version.as_str(), filter.kind.as_str())
        != (event.kind.0.as_str(), event.kind.1.as_str())
    {
        return None;
    }
    let now = filter.matches(&event.object);
    let kind_type = match event.kind_type {
        EventType::Modified => {
            let before = event.old.as_ref().is_some_and(|o| filter.matches(o));
            match (before, now) {
                (true, true) => EventType::Modified,
                (false, true) => EventType::Added,
                (true, false) => EventType::Deleted,
                (false, false) => return None,
            }
        }
        other if now => other,
        _ => return None,
    };
    Some(watch_line(kind_type.as_str(), &event.object))
}

fn watch_line(kind_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind_type, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
fn spec_of(object: &Value) -> Value {
    let mut rest = object.clone();
    if let Some(map) = rest.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    rest
}

fn metadata_mut(object: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn object_key(object: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    (
        s(&object["apiVersion"]),
        s(&object["kind"]),
        s(&object["metadata"]["namespace"]),
        s(&object["metadata"]["name"]),
    )
}

fn uid(rv: u64) -> String {
    format!("00000000-0000-4000-8000-{rv:012x}")
}

impl FakeApiServer {
    /// Starts a server on `127.0.0.1:0`.
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 for the fake API server");
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared::default());
        let weak = Arc::downgrade(&shared);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                drop(shared);
                let weak = weak.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let weak = weak.clone();
                        async move {
                            let response = match weak.upgrade() {
                                Some(shared) => handle(&shared, req).await,
                                None => status_response(503, "ServiceUnavailable", "stopping"),
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        FakeApiServer {
            shared,
            _guard: Arc::new(StopGuard(task)),
            url: format!("http://{addr}"),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Serves one more kind (replacing a registration with the same apiVersion and kind).
    pub fn register(&self, kind: KindInfo) {
        let mut state = self.state();
        state
            .kinds
            .retain(|k| !(k.api_version == kind.api_version && k.kind == kind.kind));
        state.kinds.push(kind);
    }

    /// Creates or replaces an object by (apiVersion, kind, namespace, name), as a client's create
    /// or update would: sets `metadata.resourceVersion` (one global counter), `uid` and
    /// `creationTimestamp` (kept on replace), sends ADDED or MODIFIED to matching watches, and
    /// returns the stored object.
    ///
    /// Panics if the object has no apiVersion, kind or name, or its kind is not registered: a
    /// test scripting the server wrongly should fail loudly.
    pub fn apply(&self, object: Value) -> Value {
        let mut state = self.state();
        let (api_version, kind, namespace, name) = object_key(&object);
        let info = state.kind_by_name(&api_version, &kind).unwrap_or_else(|| {
            panic!("fake API server: kind {kind} ({api_version}) is not registered")
        });
        assert!(
            !name.is_empty(),
            "fake API server: {kind} without metadata.name"
        );
        if info.namespaced {
            assert!(
                !namespace.is_empty(),
                "fake API server: {kind} {name} needs metadata.namespace"
            );
        }
        state.store(object)
    }

    /// Deletes an object, sending DELETED (the object with a new resourceVersion) to matching
    /// watches. False if there was no such object.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let key = (
            api_version.to_string(),
            kind.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.state().remove(&key).is_some()
    }

    /// The stored object (with apiVersion and kind), if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            api_version.to_string(),
            kind.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.state().objects.get(&key).cloned()
    }

    /// Every stored object of one kind (with apiVersion and kind), ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        self.state()
            .objects
            .iter()
            .filter(|((a, k, _, _), _)| a == api_version && k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Ends every open watch response cleanly (the final chunk is sent), as an API server's
    /// watch timeout does.
    pub fn drop_watches(&self) {
        self.state().watchers.clear();
    }

    /// Forgets the event history up to now: a later watch from an older resourceVersion gets
    /// `410 Gone` (as an ERROR event in the stream).
    pub fn compact(&self) {
        let mut state = self.state();
        state.compacted = state.resource_version;
        state.history.clear();
    }

    /// Answers POSTs to the resource `plural` (in any namespace) with `handler` instead of
    /// storing them: `Ok(object)` is returned with 201, `Err((code, message))` as a Status.
    pub fn on_create(
        &self,
        plural: &str,
        handler: impl Fn(Value) -> Result<Value, (u16, String)> + Send + Sync + 'static,
    ) {
        self.state()
            .create_handlers
            .insert(plural.to_string(), Arc::new(handler));
    }

    /// The next request with this method whose path starts with `path_prefix` is answered with
    /// an error Status carrying `code`. Calls queue up: each rule is used once.
    pub fn fail_next(&self, method: &str, path_prefix: &str, code: u16) {
        self.state().fail_rules.push(FailRule {
            method: method.to_ascii_uppercase(),
            path_prefix: path_prefix.to_string(),
            code,
        });
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Waits (at most `timeout`) until at least `count` watches on paths containing
    /// `path_contains` are open; true if they are.
    pub async fn wait_for_watches(
        &self,
        path_contains: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open = {
                let mut state = self.state();
                state.watchers.retain(|w| !w.tx.is_closed());
                state
                    .watchers
                    .iter()
                    .filter(|w| w.path.contains(path_contains))
                    .count()
            };
            if open >= count {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A parsed request target.
struct Target {
    kind: KindInfo,
    namespace: Option<String>,
    name: Option<String>,
    /// The path ends in the `status` subresource.
    status: bool,
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// A Status value as a response with its own code.
fn status_json(status: &Value) -> Response<Body> {
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .unwrap_or(500);
    json_response(code, status)
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_value(code, reason, message))
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response parts are valid")
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves a path to the kind and, when present, namespace and name it addresses.
fn resolve(state: &State, path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (version.to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let find = |plural: &str| state.kind_by_plural(&api_version, plural).cloned();
    // A trailing `status` subresource addresses the object itself (writes there change only
    // its status).
    let (rest, status) = match rest {
        [head @ .., "status"] if head.len() == 2 || head.len() == 4 => (head, true),
        other => (other, false),
    };
    match rest {
        [plural] => Some(Target {
            kind: find(plural)?,
            namespace: None,
            name: None,
            status,
        }),
        ["namespaces", ns, plural] => {
            let kind = find(plural)?;
            kind.namespaced.then(|| Target {
                kind,
                namespace: Some(ns.to_string()),
                name: None,
                status,
            })
        }
        [plural, name] => {
            let kind = find(plural)?;
            (!kind.namespaced).then(|| Target {
                kind,
                namespace: None,
                name: Some(name.to_string()),
                status,
            })
        }
        ["namespaces", ns, plural, name] => {
            let kind = find(plural)?;
            kind.namespaced.then(|| Target {
                kind,
                namespace: Some(ns.to_string()),
                name: Some(name.to_string()),
                status,
            })
        }
        _ => None,
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    {
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            watch,
        });
        if let Some(i) = state
            .fail_rules
            .iter()
            .position(|r| r.method == method.as_str() && path.starts_with(&r.path_prefix))
        {
            let rule = state.fail_rules.remove(i);
            return status_response(
                rule.code,
                reason_for(rule.code),
                &format!("injected failure for {method} {path}"),
            );
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status_response(400, "BadRequest", &format!("reading body: {e}")),
    };
    if method == Method::GET && path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-ambit-fake", "platform": "linux/amd64"}),
        );
    }
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(target) = resolve(&state, &path) else {
        return status_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({method} {path})"),
        );
    };
    let parse_body = || -> Result<Value, Value> {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| status_value(400, "BadRequest", "the request body is not a JSON object"))
    };
    match (&method, &target.name) {
        (&Method::GET, None) => {
            let filter = match filter_for(&target, &query) {
                Ok(f) => f,
                Err(e) => return status_response(400, "BadRequest", &e),
            };
            if watch {
                start_watch(&mut state, filter, &path, &query)
            } else {
                list(&state, &target, &filter)
            }
        }
        (&Method::GET, Some(_)) if watch => {
            let mut filter = match filter_for(&target, &query) {
                Ok(f) => f,
                Err(e) => return status_response(400, "BadRequest", &e),
            };
            filter.name = target.name.clone();
            start_watch(&mut state, filter, &path, &query)
        }
        (&Method::GET, Some(name)) => match state.objects.get(&key_for(&target, name)) {
            Some(object) => json_response(200, object),
            None => not_found(&target, name),
        },
        (&Method::POST, None) => {
            let mut object = match parse_body() {
                Ok(o) => o,
                Err(status) => return status_json(&status),
            };
            if let Some(handler) = state.create_handlers.get(&target.kind.plural).cloned() {
                drop(state);
                return match handler(object) {
                    Ok(v) => json_response(201, &v),
                    Err((code, message)) => status_response(code, reason_for(code), &message),
                };
            }
            if let Err(status) = fill_identity(&target, &mut object, None) {
                return status_json(&status);
            }
            let meta = metadata_mut(&mut object);
            if meta
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
                && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
            {
                let name = format!("{prefix}{:05x}", state.resource_version + 1);
                metadata_mut(&mut object).insert("name".into(), Value::String(name));
            }
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if name.is_empty() {
                return status_response(
                    422,
                    "Invalid",
                    &format!("{}: metadata.name: Required value", target.kind.kind),
                );
            }
            if state.objects.contains_key(&key_for(&target, &name)) {
                return status_response(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", target.kind.plural),
                );
            }
            metadata_mut(&mut object).remove("resourceVersion");
            let stored = state.store(object);
            json_response(201, &stored)
        }
        (&Method::PUT, Some(name)) => {
            let mut object = match parse_body() {
                Ok(o) => o,
                Err(status) => return status_json(&status),
            };
            if let Err(status) = fill_identity(&target, &mut object, Some(name)) {
                return status_json(&status);
            }
            if target.status {
                let Some(current) = state.objects.get(&key_for(&target, name)) else {
                    return not_found(&target, name);
                };
                object = with_status_of(current, &object);
            }
            update(&mut state, &target, name, object)
        }
        (&Method::PATCH, Some(name)) if content_type == "application/apply-patch+yaml" => {
            let applied = match parse_body() {
                Ok(o) => o,
                Err(status) => return status_json(&status),
            };
            server_side_apply(&mut state, &target, name, &query, applied)
        }
        (&Method::PATCH, Some(name)) => {
            if !matches!(
                content_type.as_str(),
                "application/merge-patch+json" | "application/strategic-merge-patch+json"
            ) {
                return status_response(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the fake API server does not support patches of type {content_type:?}"
                    ),
                );
            }
            let patch = match parse_body() {
                Ok(o) => o,
                Err(status) => return status_json(&status),
            };
            let Some(mut object) = state.objects.get(&key_for(&target, name)).cloned() else {
                return not_found(&target, name);
            };
            let current_rv = object["metadata"]["resourceVersion"].clone();
            let before = object.clone();
            merge_patch(&mut object, &patch);
            if target.status {
                object = with_status_of(&before, &object);
            }
            // A resourceVersion in the patch is a precondition; otherwise the patch applies to
            // whatever is current.
            if patch["metadata"]["resourceVersion"].is_null() {
                metadata_mut(&mut object).insert("resourceVersion".into(), current_rv);
            }
            if let Err(status) = fill_identity(&target, &mut object, Some(name)) {
                return status_json(&status);
            }
            update(&mut state, &target, name, object)
        }
        (&Method::DELETE, Some(name)) => match state.remove(&key_for(&target, name)) {
            Some(object) => json_response(200, &object),
            None => not_found(&target, name),
        },
        _ => status_response(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported on {path}"),
        ),
    }
}

/// `current` with the status (and a resourceVersion precondition) of `written`: what a write to
/// the status subresource may change.
fn with_status_of(current: &Value, written: &Value) -> Value {
    let mut object = current.clone();
    match written.get("status") {
        Some(status) => object["status"] = status.clone(),
        None => {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
    }
    let rv = written["metadata"]["resourceVersion"].clone();
    metadata_mut(&mut object).insert("resourceVersion".into(), rv);
    object
}

/// Server-side apply, simplified: the applied configuration is merged into the object (maps
/// field by field, lists replaced whole), after removing the fields the same manager applied
/// last time and no longer does. On the main resource `status` is ignored; on the status
/// subresource only `status` counts. A missing object is created. Conflicts between managers
/// are not detected (as if every apply were forced).
fn server_side_apply(
    state: &mut State,
    target: &Target,
    name: &str,
    query: &BTreeMap<String, String>,
    mut applied: Value,
) -> Response<Body> {
    let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()).cloned() else {
        return status_response(
            400,
            "BadRequest",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        );
    };
    if let Err(status) = fill_identity(target, &mut applied, Some(name)) {
        return status_json(&status);
    }
    if let Some(map) = applied.as_object_mut() {
        if target.status {
            map.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
        } else {
            map.remove("status");
        }
    }
    let key = key_for(target, name);
    let manager_key = (
        key.clone(),
        format!("{manager}{}", if target.status { "/status" } else { "" }),
    );
    let current = state.objects.get(&key).cloned();
    let mut object = match current {
        Some(current) => current,
        None if target.status => return not_found(target, name),
        None => json!({}),
    };
    if let Some(previous) = state.applied.get(&manager_key) {
        remove_unapplied(&mut object, previous, &applied);
    }
    let rv = object["metadata"]["resourceVersion"].clone();
    merge_patch(&mut object, &applied);
    if !rv.is_null() {
        metadata_mut(&mut object).insert("resourceVersion".into(), rv);
    }
    let created = !state.objects.contains_key(&key);
    state.applied.insert(manager_key, applied);
    let stored = state.store(object);
    json_response(if created { 201 } else { 200 }, &stored)
}

/// Removes from `object` what `previous` set and `now` does not (maps recursively; identity
/// fields are kept).
fn remove_unapplied(object: &mut Value, previous: &Value, now: &Value) {
    let (Some(object), Some(previous)) = (object.as_object_mut(), previous.as_object()) else {
        return;
    };
    for (k, v) in previous {
        if matches!(k.as_str(), "apiVersion" | "kind" | "name" | "namespace") {
            continue;
        }
        match now.get(k) {
            None => {
                object.remove(k);
            }
            Some(now_v) if v.is_object() && now_v.is_object() => {
                if let Some(child) = object.get_mut(k) {
                    remove_unapplied(child, v, now_v);
                }
            }
            Some(_) => {}
        }
    }
}

fn key_for(target: &Target, name: &str) -> (String, String, String, String) {
    (
        target.kind.api_version.clone(),
        target.kind.kind.clone(),
        target.namespace.clone().unwrap_or_default(),
        name.to_string(),
    )
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    let mut status = status_value(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", target.kind.plural),
    );
    status["details"] = json!({"name": name, "kind": target.kind.plural});
    json_response(404, &status)
}

/// Sets apiVersion and kind, and checks the body's namespace and name against the path.
fn fill_identity(target: &Target, object: &mut Value, name: Option<&str>) -> Result<(), Value> {
    object["apiVersion"] = Value::String(target.kind.api_version.clone());
    object["kind"] = Value::String(target.kind.kind.clone());
    let meta = metadata_mut(object);
    if let Some(ns) = &target.namespace {
        match meta.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("namespace".into(), Value::String(ns.clone()));
            }
            Some(other) if other != ns => {
                return Err(status_value(
                    400,
                    "BadRequest",
                    &format!(
                        "the namespace of the provided object ({other}) does not match the namespace sent on the request ({ns})"
                    ),
                ));
            }
            Some(_) => {}
        }
    } else {
        meta.remove("namespace");
    }
    if let Some(name) = name {
        match meta.get("name").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("name".into(), Value::String(name.to_string()));
            }
            Some(other) if other != name => {
                return Err(status_value(
                    400,
                    "BadRequest",
                    &format!(
                        "the name of the object ({other}) does not match the name on the URL ({name})"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn update(state: &mut State, target: &Target, name: &str, object: Value) -> Response<Body> {
    let key = key_for(target, name);
    let Some(current) = state.objects.get(&key) else {
        return not_found(target, name);
    };
    let current_rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("");
    match object["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != current_rv => {
            return status_response(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    target.kind.plural
                ),
            );
        }
        _ => {}
    }
    let stored = state.store(object);
    json_response(200, &stored)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn filter_for(target: &Target, query: &BTreeMap<String, String>) -> Result<Filter, String> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| format!("unable to parse labelSelector: {e}"))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| format!("unable to parse fieldSelector: {e}"))?;
    Ok(Filter {
        api_version: target.kind.api_version.clone(),
        kind: target.kind.kind.clone(),
        namespace: target.namespace.clone(),
        name: None,
        labels,
        fields,
    })
}

fn list(state: &State, target: &Target, filter: &Filter) -> Response<Body> {
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((a, k, _, _), v)| {
            *a == target.kind.api_version && *k == target.kind.kind && filter.matches(v)
        })
        .map(|(_, v)| {
            let mut item = v.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    let list_api_version = target.kind.api_version.clone();
    json_response(
        200,
        &json!({
            "apiVersion": list_api_version,
            "kind": format!("{}List", target.kind.kind),
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        }),
    )
}

fn start_watch(
    state: &mut State,
    filter: Filter,
    path: &str,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let from = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let mut keep_open = true;
    if from.is_empty() || from == "0" {
        // No starting point: the current state as synthetic ADDED events, then live events.
        for ((a, k, _, _), object) in &state.objects {
            if *a == filter.api_version && *k == filter.kind && filter.matches(object) {
                let _ = tx.send(watch_line("ADDED", object));
            }
        }
    } else {
        let Ok(n) = from.parse::<u64>() else {
            return status_response(
                400,
                "BadRequest",
                &format!("invalid resource version {from:?}"),
            );
        };
        if n < state.compacted {
            let status = status_value(
                410,
                "Expired",
                &format!("too old resource version: {n} ({})", state.compacted),
            );
            let _ = tx.send(watch_line("ERROR", &status));
            keep_open = false;
        } else {
            for event in state.history.iter().filter(|e| e.rv > n) {
                if let Some(line) = event_line(&filter, event) {
                    let _ = tx.send(line);
                }
            }
        }
    }
    if keep_open {
        state.watchers.push(Watcher {
            path: path.to_string(),
            filter,
            tx,
        });
    } else {
        drop(tx);
    }
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .take_until(tokio::time::sleep(timeout))
        .map(|line| Ok::<_, Infallible>(Frame::data(line)));
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response parts are valid")
}
