//! kube-rs watchers over the kinds Ambit reads, merged into one stream of typed updates.
//!
//! Each [`Watch`] runs one kube-rs [`watcher`] over `DynamicObject`s. Its initial list (and every
//! relist, say after `410 Gone`) becomes one [`Update::Reset`] holding the complete set of that
//! kind; later changes become [`Update::Applied`] and [`Update::Deleted`]. Objects are converted
//! with [`ambit_mesh::parse_object`], so an invalid object is reported with its name and field
//! instead of silently dropped. Errors are logged and retried with capped exponential backoff,
//! forever; a kind the API server does not serve (its CRD is not installed) is reported once and
//! counts as empty until it appears.

use std::collections::VecDeque;
use std::time::Duration;

use ambit_mesh::{Object, ObjectError, ObjectKey};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

/// One kind of object: where the API server serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KindSpec {
    /// `v1`, `security.istio.io/v1`, ...
    pub api_version: &'static str,
    /// `Pod`, `AuthorizationPolicy`, ...
    pub kind: &'static str,
    /// The resource name in paths: `pods`, `authorizationpolicies`, ...
    pub plural: &'static str,
    /// Whether objects of this kind live in a namespace.
    pub namespaced: bool,
}

impl KindSpec {
    /// The kube-rs description of this kind.
    pub fn api_resource(&self) -> ApiResource {
        let (group, version) = match self.api_version.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", self.api_version),
        };
        ApiResource {
            group: group.to_string(),
            version: version.to_string(),
            api_version: self.api_version.to_string(),
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }
}

/// `v1` Namespace.
pub const NAMESPACE: KindSpec = KindSpec {
    api_version: "v1",
    kind: "Namespace",
    plural: "namespaces",
    namespaced: false,
};
/// `v1` Pod.
pub const POD: KindSpec = KindSpec {
    api_version: "v1",
    kind: "Pod",
    plural: "pods",
    namespaced: true,
};
/// `v1` Service.
pub const SERVICE: KindSpec = KindSpec {
    api_version: "v1",
    kind: "Service",
    plural: "services",
    namespaced: true,
};
/// `discovery.k8s.io/v1` EndpointSlice.
pub const ENDPOINT_SLICE: KindSpec = KindSpec {
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    namespaced: true,
};
/// `v1` Node.
pub const NODE: KindSpec = KindSpec {
    api_version: "v1",
    kind: "Node",
    plural: "nodes",
    namespaced: false,
};
/// `security.istio.io/v1` AuthorizationPolicy.
pub const AUTHORIZATION_POLICY: KindSpec = KindSpec {
    api_version: "security.istio.io/v1",
    kind: "AuthorizationPolicy",
    plural: "authorizationpolicies",
    namespaced: true,
};
/// `security.istio.io/v1` PeerAuthentication.
pub const PEER_AUTHENTICATION: KindSpec = KindSpec {
    api_version: "security.istio.io/v1",
    kind: "PeerAuthentication",
    plural: "peerauthentications",
    namespaced: true,
};
/// `gateway.networking.k8s.io/v1` Gateway.
pub const GATEWAY: KindSpec = KindSpec {
    api_version: "gateway.networking.k8s.io/v1",
    kind: "Gateway",
    plural: "gateways",
    namespaced: true,
};
/// `gateway.networking.k8s.io/v1` GatewayClass (cluster-scoped; carries a class-wide
/// `istio.io/waypoint-for`).
pub const GATEWAY_CLASS: KindSpec = KindSpec {
    api_version: "gateway.networking.k8s.io/v1",
    kind: "GatewayClass",
    plural: "gatewayclasses",
    namespaced: false,
};
/// `gateway.networking.k8s.io/v1` HTTPRoute.
pub const HTTP_ROUTE: KindSpec = KindSpec {
    api_version: "gateway.networking.k8s.io/v1",
    kind: "HTTPRoute",
    plural: "httproutes",
    namespaced: true,
};
/// `networking.istio.io/v1` DestinationRule.
pub const DESTINATION_RULE: KindSpec = KindSpec {
    api_version: "networking.istio.io/v1",
    kind: "DestinationRule",
    plural: "destinationrules",
    namespaced: true,
};

/// `gateway.networking.k8s.io/v1` GRPCRoute (waypoint routes, like HTTPRoute).
pub const GRPC_ROUTE: KindSpec = KindSpec {
    api_version: "gateway.networking.k8s.io/v1",
    kind: "GRPCRoute",
    plural: "grpcroutes",
    namespaced: true,
};
/// `networking.istio.io/v1` VirtualService (waypoint routes in Istio's form).
pub const VIRTUAL_SERVICE: KindSpec = KindSpec {
    api_version: "networking.istio.io/v1",
    kind: "VirtualService",
    plural: "virtualservices",
    namespaced: true,
};

/// Everything istiod-lite reads (and `ambitctl analyze --cluster` lists).
pub const CONTROL_PLANE_KINDS: &[KindSpec] = &[
    NAMESPACE,
    POD,
    SERVICE,
    ENDPOINT_SLICE,
    NODE,
    AUTHORIZATION_POLICY,
    PEER_AUTHENTICATION,
    GATEWAY,
    GATEWAY_CLASS,
    HTTP_ROUTE,
    GRPC_ROUTE,
    DESTINATION_RULE,
    VIRTUAL_SERVICE,
];

/// One kind to watch, optionally narrowed by selectors (as `kubectl get -l ... --field-selector`).
/// Watch each kind at most once: a kind's [`Update::Reset`] replaces everything held of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The kind.
    pub kind: KindSpec,
    /// A field selector, e.g. `spec.nodeName=node1`.
    pub field_selector: Option<String>,
    /// A label selector, e.g. `app=web,tier!=db`.
    pub label_selector: Option<String>,
}

impl Watch {
    /// Every object of `kind`, cluster-wide.
    pub fn all(kind: KindSpec) -> Self {
        Watch {
            kind,
            field_selector: None,
            label_selector: None,
        }
    }
}

/// What changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The complete current set of one kind, after the initial list or a relist (e.g. forced by
    /// 410 Gone): replace everything held of that kind with these.
    Reset {
        /// The kind (`Pod`, ...).
        kind: &'static str,
        /// Every accepted object of that kind.
        objects: Vec<Object>,
        /// Every object of that kind that failed validation.
        rejected: Vec<ObjectError>,
    },
    /// Added or changed (boxed: an object is large next to the other variants).
    Applied(Box<Object>),
    /// Gone.
    Deleted(ObjectKey),
    /// A changed object failed validation: keep serving its last good version, report this.
    Rejected(ObjectError),
}

/// Where errors and conversions are reported from.
const SOURCE: &str = "Kubernetes";
/// First retry delay after an error; doubles up to [`MAX_BACKOFF`], reset by any success.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One stream merging a kube-rs watcher per Watch (DynamicObject + ApiResource), objects converted
/// with ambit_mesh::parse_object(value, "Kubernetes") after restoring apiVersion/kind; retries with
/// backoff forever; logs watch errors.
///
/// The stream never ends. Nothing is requested from the API server until it is polled.
pub fn watch(
    client: kube::Client,
    watches: Vec<Watch>,
) -> impl Stream<Item = Update> + Send + 'static {
    futures::stream::select_all(
        watches
            .into_iter()
            .map(move |w| watch_one(client.clone(), w).boxed()),
    )
}

struct KindState {
    spec: KindSpec,
    events: BoxStream<'static, Result<watcher::Event<DynamicObject>, watcher::Error>>,
    /// Updates ready to hand out.
    ready: VecDeque<Update>,
    /// The list in progress (between `Init` and `InitDone`).
    listing: (Vec<Object>, Vec<ObjectError>),
    /// Delay before polling again after an error.
    sleep: Option<Duration>,
    backoff: Duration,
    /// The API server answered 404 for this kind (and it was reported).
    missing: bool,
}

fn watch_one(client: kube::Client, w: Watch) -> impl Stream<Item = Update> + Send + 'static {
    let api: Api<DynamicObject> = Api::all_with(client, &w.kind.api_resource());
    let mut config = watcher::Config::default();
    if let Some(fields) = &w.field_selector {
        config = config.fields(fields);
    }
    if let Some(labels) = &w.label_selector {
        config = config.labels(labels);
    }
    let state = KindState {
        spec: w.kind,
        events: watcher(api, config).boxed(),
        ready: VecDeque::new(),
        listing: Default::default(),
        sleep: None,
        backoff: INITIAL_BACKOFF,
        missing: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(update) = s.ready.pop_front() {
                return Some((update, s));
            }
            if let Some(delay) = s.sleep.take() {
                tokio::time::sleep(delay).await;
            }
            // A kube-rs watcher never ends on its own; if it did, so does this kind's stream.
            let event = s.events.next().await?;
            s.handle(event);
        }
    })
}

impl KindState {
    fn handle(&mut self, event: Result<watcher::Event<DynamicObject>, watcher::Error>) {
        let kind = self.spec.kind;
        match event {
            Ok(watcher::Event::Init) => {
                self.listing = Default::default();
            }
            Ok(watcher::Event::InitApply(object)) => {
                let (objects, errors) = convert(&self.spec, object);
                self.listing.0.extend(objects);
                self.listing.1.extend(errors);
            }
            Ok(watcher::Event::InitDone) => {
                self.succeeded();
                let (objects, rejected) = std::mem::take(&mut self.listing);
                debug!(
                    kind,
                    objects = objects.len(),
                    rejected = rejected.len(),
                    "listed"
                );
                self.ready.push_back(Update::Reset {
                    kind,
                    objects,
                    rejected,
                });
            }
            Ok(watcher::Event::Apply(object)) => {
                self.succeeded();
                let (objects, errors) = convert(&self.spec, object);
                self.ready
                    .extend(objects.into_iter().map(|o| Update::Applied(Box::new(o))));
                self.ready.extend(errors.into_iter().map(Update::Rejected));
            }
            Ok(watcher::Event::Delete(object)) => {
                self.succeeded();
                self.ready.push_back(Update::Deleted(ObjectKey {
                    kind: kind.to_string(),
                    namespace: object.namespace().unwrap_or_default(),
                    name: object.name_any(),
                }));
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == 404 =>
            {
                if !self.missing {
                    self.missing = true;
                    warn!(
                        kind,
                        api_version = self.spec.api_version,
                        "kind {kind} ({}) not served by the API server; install its CRD. \
                         Treating it as empty and retrying",
                        self.spec.api_version
                    );
                    // Nothing of this kind exists as far as anyone can tell: an empty set, so
                    // that readiness does not wait on it forever.
                    self.ready.push_back(Update::Reset {
                        kind,
                        objects: Vec::new(),
                        rejected: Vec::new(),
                    });
                }
                self.back_off(Duration::from_secs(60));
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // Expected after compaction: the watcher relists at once.
                info!(kind, message = %status.message, "watch expired (410 Gone); relisting");
            }
            Err(error) => {
                warn!(kind, %error, retry_in = ?self.backoff, "watch error; retrying");
                self.back_off(MAX_BACKOFF);
            }
        }
    }

    fn succeeded(&mut self) {
        if self.missing {
            info!(
                kind = self.spec.kind,
                "kind {} is now served by the API server", self.spec.kind
            );
            self.missing = false;
        }
        self.backoff = INITIAL_BACKOFF;
    }

    fn back_off(&mut self, max: Duration) {
        self.sleep = Some(jitter(self.backoff));
        self.backoff = (self.backoff * 2).min(max);
    }
}

/// `delay` plus up to a quarter more, so that many watchers do not retry in lockstep.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// An API object as Ambit's typed objects (or the errors naming what is wrong with it).
fn convert(spec: &KindSpec, object: DynamicObject) -> (Vec<Object>, Vec<ObjectError>) {
    let name = format!(
        "{} {}",
        spec.kind,
        match object.namespace() {
            Some(ns) => format!("{ns}/{}", object.name_any()),
            None => object.name_any(),
        }
    );
    let mut value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(e) => {
            return (
                Vec::new(),
                vec![ObjectError {
                    source_name: SOURCE.to_string(),
                    document: 0,
                    object: name,
                    field: "-".to_string(),
                    reason: format!("cannot be represented as JSON: {e}"),
                }],
            );
        }
    };
    // List items carry no apiVersion/kind; the watch knows what it asked for.
    value["apiVersion"] = serde_json::Value::String(spec.api_version.to_string());
    value["kind"] = serde_json::Value::String(spec.kind.to_string());
    if let Some(metadata) = value
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        metadata.remove("managedFields");
    }
    ambit_mesh::parse_object(value, SOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_resources_split_group_and_version() {
        let core = POD.api_resource();
        assert_eq!((core.group.as_str(), core.version.as_str()), ("", "v1"));
        let policy = AUTHORIZATION_POLICY.api_resource();
        assert_eq!(policy.group, "security.istio.io");
        assert_eq!(policy.version, "v1");
        assert_eq!(policy.plural, "authorizationpolicies");
    }

    #[test]
    fn conversion_restores_type_and_strips_managed_fields() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "demo",
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                "labels": {"app": "web"},
            },
            "spec": {"nodeName": "n1"},
            "status": {"podIP": "10.0.0.7"},
        }))
        .unwrap();
        let (objects, errors) = convert(&POD, object);
        assert!(errors.is_empty(), "{errors:?}");
        match objects.as_slice() {
            [Object::Pod(pod)] => {
                assert_eq!(pod.metadata.name, "web");
                assert_eq!(pod.metadata.namespace, "demo");
            }
            other => panic!("expected one pod, got {other:?}"),
        }

        let other: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw", "namespace": "demo", "managedFields": []},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }))
        .unwrap();
        let (objects, _) = convert(&GATEWAY, other);
        match objects.as_slice() {
            [Object::Other { key, value, .. }] => {
                assert_eq!(key.kind, "Gateway");
                assert!(value["metadata"].get("managedFields").is_none());
            }
            [object] => assert_eq!(object.key().kind, "Gateway"),
            other => panic!("expected one gateway, got {other:?}"),
        }
    }

    #[test]
    fn conversion_errors_name_object_and_field() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "demo"},
            "status": {"podIP": "10.0.0.300"},
        }))
        .unwrap();
        let (objects, errors) = convert(&POD, object);
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].source_name, "Kubernetes");
        assert!(errors[0].object.contains("demo/bad"), "{}", errors[0]);
        assert!(errors[0].field.contains("podIP"), "{}", errors[0]);
    }
}
