//! A cache of API objects as JSON, kept current by kube-rs watchers, for controllers that need
//! what Ambit's typed objects leave out (`metadata.generation`, `uid`, `ownerReferences`, other
//! controllers' status).
//!
//! [`Cache::new`] returns the cache and the future that feeds it; run that future on a task.
//! Each kind's initial list (and every relist) replaces what is held of it; a kind whose list
//! the API server answers with 404 (its CRD is not installed) counts as listed and empty, and is
//! retried. Every change bumps a counter that [`Cache::subscribe`] exposes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use kube::Api;
use kube::api::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::watch::Watch;

/// (namespace, name); the namespace is empty for cluster-scoped kinds.
pub type ObjectName = (String, String);

#[derive(Debug, Default)]
struct KindObjects {
    objects: BTreeMap<ObjectName, Value>,
    /// The list in progress (between `Init` and `InitDone`).
    listing: BTreeMap<ObjectName, Value>,
    /// The first list arrived (or the kind is not served).
    synced: bool,
    /// The API server answered 404 (reported once).
    missing: bool,
}

#[derive(Debug)]
struct Inner {
    kinds: Mutex<BTreeMap<&'static str, KindObjects>>,
    changes: watch::Sender<u64>,
}

/// Objects of the watched kinds by kind, then (namespace, name). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl Cache {
    /// A cache of `watches` (at most one per kind) and the future that keeps it current; nothing
    /// is requested until that future runs. The future never ends on its own.
    pub fn new(
        client: kube::Client,
        watches: Vec<Watch>,
    ) -> (Cache, impl Future<Output = ()> + Send + 'static) {
        let kinds = watches
            .iter()
            .map(|w| (w.kind.kind, KindObjects::default()))
            .collect();
        let cache = Cache {
            inner: Arc::new(Inner {
                kinds: Mutex::new(kinds),
                changes: watch::channel(0).0,
            }),
        };
        let streams = watches.into_iter().map(move |w| {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &w.kind.api_resource());
            let mut config = watcher::Config::default();
            if let Some(fields) = &w.field_selector {
                config = config.fields(fields);
            }
            if let Some(labels) = &w.label_selector {
                config = config.labels(labels);
            }
            let spec = w.kind;
            watcher(api, config)
                .default_backoff()
                .map(move |event| (spec, event))
                .boxed()
        });
        let feeder = cache.clone();
        let run = async move {
            let mut events = futures::stream::select_all(streams);
            while let Some((spec, event)) = events.next().await {
                feeder.handle(spec, event);
            }
        };
        (cache, run)
    }

    fn kinds(&self) -> MutexGuard<'_, BTreeMap<&'static str, KindObjects>> {
        self.inner.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(
        &self,
        spec: crate::watch::KindSpec,
        event: Result<watcher::Event<DynamicObject>, watcher::Error>,
    ) {
        let changed = {
            let mut kinds = self.kinds();
            let Some(held) = kinds.get_mut(spec.kind) else {
                return;
            };
            match event {
                Ok(watcher::Event::Init) => {
                    held.listing.clear();
                    false
                }
                Ok(watcher::Event::InitApply(object)) => {
                    let (name, value) = to_value(&spec, object);
                    held.listing.insert(name, value);
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    held.objects = std::mem::take(&mut held.listing);
                    held.synced = true;
                    if held.missing {
                        held.missing = false;
                        info!(kind = spec.kind, "kind {} is now served", spec.kind);
                    }
                    true
                }
                Ok(watcher::Event::Apply(object)) => {
                    let (name, value) = to_value(&spec, object);
                    held.objects.insert(name, value);
                    true
                }
                Ok(watcher::Event::Delete(object)) => {
                    let (name, _) = to_value(&spec, object);
                    held.objects.remove(&name).is_some()
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.code == 404 =>
                {
                    let first = !held.missing;
                    if first {
                        warn!(
                            kind = spec.kind,
                            "kind {} ({}) not served by the API server; treating it as empty and retrying",
                            spec.kind,
                            spec.api_version
                        );
                    }
                    held.missing = true;
                    held.objects.clear();
                    let newly = !held.synced;
                    held.synced = true;
                    first || newly
                }
                Err(error) => {
                    warn!(kind = spec.kind, %error, "watch error; retrying with backoff");
                    false
                }
            }
        };
        if changed {
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    /// Whether every kind's first list arrived.
    pub fn synced(&self) -> bool {
        self.kinds().values().all(|k| k.synced)
    }

    /// The kinds not listed yet.
    pub fn unsynced(&self) -> BTreeSet<&'static str> {
        self.kinds()
            .iter()
            .filter(|(_, k)| !k.synced)
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// Every object held of `kind` (with apiVersion and kind), by namespace and name.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        self.kinds()
            .get(kind)
            .map(|k| k.objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One object of `kind`.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.kinds()
            .get(kind)?
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// A counter bumped on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

/// The object as JSON with apiVersion and kind restored (list items carry none) and
/// `managedFields` dropped.
fn to_value(spec: &crate::watch::KindSpec, object: DynamicObject) -> (ObjectName, Value) {
    let name = (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    );
    let mut value = serde_json::to_value(&object).unwrap_or(Value::Null);
    if !value.is_object() {
        value = serde_json::json!({});
    }
    value["apiVersion"] = Value::String(spec.api_version.to_string());
    value["kind"] = Value::String(spec.kind.to_string());
    if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("managedFields");
    }
    (name, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{GATEWAY, SERVICE};
    use ambit_fake_apiserver::FakeApiServer;
    use serde_json::json;
    use std::time::Duration;

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn holds_raw_objects_and_counts_an_unserved_kind_as_empty() {
        let server = FakeApiServer::start().await;
        server.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"ports": [{"port": 80}]},
            "status": {"conditions": [{"type": "x", "status": "True"}]},
        }));
        let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap()))
            .expect("client");
        let unserved = crate::watch::KindSpec {
            api_version: "example.com/v1",
            kind: "Thing",
            plural: "things",
            namespaced: true,
        };
        let (cache, run) = Cache::new(
            client,
            vec![
                Watch::all(SERVICE),
                Watch::all(GATEWAY),
                Watch::all(unserved),
            ],
        );
        let mut changes = cache.subscribe();
        let task = tokio::spawn(run);
        eventually("every kind listed", || cache.synced()).await;
        let echo = cache.get("Service", "demo", "echo").expect("held");
        assert_eq!(echo["kind"], "Service");
        assert_eq!(echo["metadata"]["generation"], 1);
        assert_eq!(echo["status"]["conditions"][0]["type"], "x");
        assert!(cache.objects("Thing").is_empty());

        changes.borrow_and_update();
        server.apply(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "demo"},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }));
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("a change within 10s")
            .expect("cache alive");
        eventually("the gateway arrives", || {
            cache.get("Gateway", "demo", "wp").is_some()
        })
        .await;
        server.delete("v1", "Service", "demo", "echo");
        eventually("the service goes", || cache.objects("Service").is_empty()).await;
        task.abort();
    }
}
