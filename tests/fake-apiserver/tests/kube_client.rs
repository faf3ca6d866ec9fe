//! kube-rs, unmodified, against the fake API server: typed lists, watchers that resume after a
//! dropped watch and relist after 410 Gone, selectors, writes with real conflict semantics,
//! merge patches and create hooks.

use std::collections::BTreeSet;
use std::time::Duration;

use ambit_fake_apiserver::{FakeApiServer, KindInfo};
use futures::{Stream, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use serde_json::json;

const STEP: Duration = Duration::from_secs(10);

fn client(server: &FakeApiServer) -> Client {
    let config = Config::new(server.url().parse().expect("server URL"));
    Client::try_from(config).expect("kube client")
}

fn pod(ns: &str, name: &str, labels: serde_json::Value, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
    })
}

/// The next watcher event, failing the test if none arrives within [`STEP`].
async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("no watcher event within the step timeout")
        .expect("watcher stream ended")
}

/// Reads events until `InitDone`, returning the names listed.
async fn initial<S>(stream: &mut S) -> BTreeSet<String>
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let mut names = BTreeSet::new();
    assert!(matches!(next(stream).await, Ok(watcher::Event::Init)));
    loop {
        match next(stream).await {
            Ok(watcher::Event::InitApply(p)) => {
                names.insert(p.name_any());
            }
            Ok(watcher::Event::InitDone) => return names,
            other => panic!("unexpected event during the initial list: {other:?}"),
        }
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn typed_list_get_and_cluster_wide() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({}), "n1"));
    server.apply(pod("b", "two", json!({}), "n1"));
    let stored = server.apply(pod("a", "three", json!({}), "n2"));
    assert!(stored["metadata"]["resourceVersion"].as_str().is_some());
    assert!(stored["metadata"]["uid"].as_str().is_some());
    assert!(stored["metadata"]["creationTimestamp"].as_str().is_some());

    let client = client(&server);
    let all: Api<Pod> = Api::all(client.clone());
    let list = all.list(&ListParams::default()).await.expect("list pods");
    let names: BTreeSet<_> = list.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, set(&["one", "two", "three"]));
    assert!(list.metadata.resource_version.is_some());

    let in_a: Api<Pod> = Api::namespaced(client.clone(), "a");
    let list = in_a
        .list(&ListParams::default())
        .await
        .expect("list pods in a");
    let names: BTreeSet<_> = list.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, set(&["one", "three"]));
    let three = in_a.get("three").await.expect("get pod");
    assert_eq!(three.spec.and_then(|s| s.node_name).as_deref(), Some("n2"));
    match in_a.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn raw_list_items_carry_no_type_and_unknown_paths_are_404() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({}), "n1"));
    let client = client(&server);
    let req = http::Request::get("/api/v1/pods").body(Vec::new()).unwrap();
    let list: serde_json::Value = client.request(req).await.expect("raw list");
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert!(list["metadata"]["resourceVersion"].as_str().is_some());
    assert!(list["items"][0].get("apiVersion").is_none());
    assert!(list["items"][0].get("kind").is_none());

    for path in [
        "/api/v1/widgets",
        "/apis/example.com/v1/things",
        "/nonsense",
    ] {
        let req = http::Request::get(path).body(Vec::new()).unwrap();
        match client.request::<serde_json::Value>(req).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 404);
                assert!(status.message.contains(path), "{}", status.message);
            }
            other => panic!("expected 404 for {path}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn watcher_sees_apply_modify_delete() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({}), "n1"));
    let api: Api<Pod> = Api::all(client(&server));
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    assert_eq!(initial(&mut stream).await, set(&["one"]));

    server.apply(pod("a", "two", json!({}), "n1"));
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "two"),
        other => panic!("expected the new pod, got {other:?}"),
    }
    server.apply(pod("a", "two", json!({"v": "2"}), "n1"));
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => {
            assert_eq!(p.labels().get("v").map(String::as_str), Some("2"))
        }
        other => panic!("expected the changed pod, got {other:?}"),
    }
    assert!(server.delete("v1", "Pod", "a", "one"));
    assert!(!server.delete("v1", "Pod", "a", "one"));
    match next(&mut stream).await {
        Ok(watcher::Event::Delete(p)) => assert_eq!(p.name_any(), "one"),
        other => panic!("expected the deletion, got {other:?}"),
    }
}

#[tokio::test]
async fn dropped_watch_resumes_from_last_seen_version_without_relisting() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({}), "n1"));
    let api: Api<Pod> = Api::all(client(&server));
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    assert_eq!(initial(&mut stream).await, set(&["one"]));
    let stored = server.apply(pod("a", "two", json!({}), "n1"));
    let last_seen = stored["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "two"),
        other => panic!("expected the new pod, got {other:?}"),
    }
    assert!(server.wait_for_watches("/api/v1/pods", 1, STEP).await);

    server.drop_watches();
    // A change made while the watcher reconnects must still arrive (replayed from history).
    server.apply(pod("a", "three", json!({}), "n1"));
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "three"),
        other => panic!("expected the pod made during the reconnect, got {other:?}"),
    }
    assert!(server.wait_for_watches("/api/v1/pods", 1, STEP).await);

    let requests = server.requests();
    let lists = requests
        .iter()
        .filter(|r| r.method == "GET" && !r.watch)
        .count();
    assert_eq!(lists, 1, "the watcher relisted: {requests:?}");
    let watches: Vec<_> = requests.iter().filter(|r| r.watch).collect();
    assert_eq!(watches.len(), 2, "{requests:?}");
    assert_eq!(
        watches[1].query.get("resourceVersion"),
        Some(&last_seen),
        "the watch must resume from the last version seen"
    );
}

#[tokio::test]
async fn compaction_forces_a_relist_that_forgets_deleted_objects() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({}), "n1"));
    server.apply(pod("a", "two", json!({}), "n1"));
    let api: Api<Pod> = Api::all(client(&server));
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    assert_eq!(initial(&mut stream).await, set(&["one", "two"]));
    // The watcher opens its watch only while polled.
    tokio::select! {
        event = stream.next() => panic!("unexpected event {event:?}"),
        open = server.wait_for_watches("/api/v1/pods", 1, STEP) => assert!(open),
    }

    // Keep the watcher away while "two" is deleted and history is compacted: its next watch
    // attempt fails, and the stream is polled again only after both have happened.
    // (500: kube-rs retries 429/503/504 inside the client.)
    server.fail_next("GET", "/api/v1/pods", 500);
    server.drop_watches();
    let event = tokio::time::timeout(STEP, stream.next()).await;
    assert!(
        matches!(event, Ok(Some(Err(watcher::Error::WatchStartFailed(_))))),
        "the injected failure should surface: {event:?} {:?}",
        server.requests()
    );
    assert!(server.delete("v1", "Pod", "a", "two"));
    server.compact();

    match next(&mut stream).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(status.message.starts_with("too old resource version"));
        }
        other => panic!("expected 410 Gone in the watch stream, got {other:?}"),
    }
    assert_eq!(initial(&mut stream).await, set(&["one"]));
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.watch)
        .count();
    assert_eq!(lists, 2, "a relist after 410");

    // The relisted watcher is live again.
    server.apply(pod("a", "four", json!({}), "n1"));
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "four"),
        other => panic!("expected the new pod, got {other:?}"),
    }
}

#[tokio::test]
async fn raw_watch_from_a_compacted_version_gets_an_expired_event() {
    let server = FakeApiServer::start().await;
    let first = server.apply(pod("a", "one", json!({}), "n1"));
    let old = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    server.apply(pod("a", "two", json!({}), "n1"));
    server.compact();
    let api: Api<Pod> = Api::all(client(&server));
    let mut events = api
        .watch(&kube::api::WatchParams::default(), &old)
        .await
        .expect("the watch itself is answered with 200")
        .boxed();
    match next(&mut events).await {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    let end = tokio::time::timeout(STEP, events.next())
        .await
        .expect("stream ends");
    assert!(end.is_none(), "the stream ends after the error");
}

#[tokio::test]
async fn selectors_filter_lists_and_watches() {
    let server = FakeApiServer::start().await;
    server.apply(pod(
        "a",
        "web1",
        json!({"app": "web", "tier": "front"}),
        "n1",
    ));
    server.apply(pod("a", "web2", json!({"app": "web"}), "n2"));
    server.apply(pod("a", "db", json!({"app": "db"}), "n1"));
    let api: Api<Pod> = Api::all(client(&server));
    let names = |list: kube::core::ObjectList<Pod>| -> BTreeSet<String> {
        list.items.iter().map(|p| p.name_any()).collect()
    };
    let cases = [
        (
            ListParams::default().labels("app=web"),
            set(&["web1", "web2"]),
        ),
        (ListParams::default().labels("app!=web"), set(&["db"])),
        (
            ListParams::default().labels("app in (db,cache)"),
            set(&["db"]),
        ),
        (
            ListParams::default().labels("app=web,!tier"),
            set(&["web2"]),
        ),
        (ListParams::default().labels("tier"), set(&["web1"])),
        (
            ListParams::default().fields("spec.nodeName=n1"),
            set(&["web1", "db"]),
        ),
        (
            ListParams::default()
                .fields("metadata.name!=web1")
                .labels("app==web"),
            set(&["web2"]),
        ),
    ];
    for (params, want) in cases {
        let got = names(api.list(&params).await.expect("list"));
        assert_eq!(got, want, "{params:?}");
    }

    // A watch on node n1 sees n1's pods only; a pod leaving the selection is a deletion.
    let config = watcher::Config::default().fields("spec.nodeName=n1");
    let mut stream = watcher(api, config).boxed();
    assert_eq!(initial(&mut stream).await, set(&["web1", "db"]));
    server.apply(pod("a", "other", json!({}), "n2"));
    server.apply(pod("a", "late", json!({}), "n1"));
    match next(&mut stream).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.name_any(), "late"),
        other => panic!("expected the n1 pod only, got {other:?}"),
    }
    server.apply(pod("a", "db", json!({"app": "db"}), "n3"));
    match next(&mut stream).await {
        Ok(watcher::Event::Delete(p)) => assert_eq!(p.name_any(), "db"),
        other => panic!("expected db to leave the selection, got {other:?}"),
    }
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([("key".to_string(), value.to_string())].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn config_map_create_replace_get_and_conflicts() {
    let server = FakeApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    let created = api
        .create(&PostParams::default(), &config_map("cfg", "1"))
        .await
        .expect("create");
    assert_eq!(created.namespace().as_deref(), Some("ns"));
    let rv1 = created.resource_version().expect("resourceVersion set");

    match api
        .create(&PostParams::default(), &config_map("cfg", "x"))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }

    let mut update = created.clone();
    update.data = Some([("key".to_string(), "2".to_string())].into());
    let replaced = api
        .replace("cfg", &PostParams::default(), &update)
        .await
        .expect("replace");
    assert_ne!(replaced.resource_version(), Some(rv1.clone()));
    assert_eq!(replaced.uid(), created.uid());

    // The same update again carries a stale resourceVersion.
    match api.replace("cfg", &PostParams::default(), &update).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected Conflict, got {other:?}"),
    }
    match api
        .replace(
            "missing",
            &PostParams::default(),
            &config_map("missing", "1"),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected NotFound, got {other:?}"),
    }

    let got = api.get("cfg").await.expect("get");
    assert_eq!(got.data.unwrap()["key"], "2");
    assert_eq!(
        server.get("v1", "ConfigMap", "ns", "cfg").unwrap()["data"]["key"],
        "2"
    );

    api.delete("cfg", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(server.get("v1", "ConfigMap", "ns", "cfg").is_none());
    match api.delete("cfg", &DeleteParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn merge_patch_sets_and_removes_an_annotation() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", "one", json!({"keep": "me"}), "n1"));
    let api: Api<Pod> = Api::namespaced(client(&server), "a");
    let patch = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}});
    let patched = api
        .patch("one", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("merge patch");
    assert_eq!(
        patched
            .annotations()
            .get("ambient.istio.io/redirection")
            .map(String::as_str),
        Some("enabled")
    );
    assert_eq!(patched.labels().get("keep").map(String::as_str), Some("me"));

    let strategic = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}});
    let patched = api
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Strategic(&strategic),
        )
        .await
        .expect("strategic merge patch");
    assert!(patched.annotations().is_empty());
    assert_eq!(
        server.get("v1", "Pod", "a", "one").unwrap()["spec"]["nodeName"],
        "n1"
    );
    match api
        .patch("missing", &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn on_create_answers_token_reviews() {
    let server = FakeApiServer::start().await;
    server.on_create("tokenreviews", |review| {
        let token = review["spec"]["token"].as_str().unwrap_or("");
        if token == "bad" {
            return Err((403, "reviews are forbidden for this test".into()));
        }
        let mut answer = review.clone();
        answer["status"] = json!({
            "authenticated": token == "good",
            "user": {"username": "system:serviceaccount:ns:sa"},
        });
        Ok(answer)
    });
    let api: Api<TokenReview> = Api::all(client(&server));
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &review("good"))
        .await
        .expect("token review");
    let status = answer.status.expect("status");
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.user.and_then(|u| u.username).as_deref(),
        Some("system:serviceaccount:ns:sa")
    );
    match api.create(&PostParams::default(), &review("bad")).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden")),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    assert!(
        server
            .list("authentication.k8s.io/v1", "TokenReview")
            .is_empty()
    );
    let posts = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/apis/authentication.k8s.io/v1/tokenreviews")
        .count();
    assert_eq!(posts, 2);
}

#[tokio::test]
async fn registered_kinds_and_injected_failures() {
    let server = FakeApiServer::start().await;
    server.register(KindInfo::new("example.com/v1", "Widget", "widgets", false));
    server.apply(
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    );
    let client = client(&server);
    let ar = kube::api::ApiResource {
        group: "example.com".into(),
        version: "v1".into(),
        api_version: "example.com/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let api: Api<kube::api::DynamicObject> = Api::all_with(client, &ar);
    server.fail_next("GET", "/apis/example.com", 500);
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 500),
        other => panic!("expected the injected 500, got {other:?}"),
    }
    let list = api
        .list(&ListParams::default())
        .await
        .expect("second list succeeds");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].name_any(), "w");
    assert_eq!(server.list("example.com/v1", "Widget").len(), 1);
}
