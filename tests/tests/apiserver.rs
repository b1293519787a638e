//! Self-tests of `mesh_tests::apiserver::FakeApiServer`, driven by the kube-rs client and
//! watcher exactly as the agent's Kubernetes layer uses them. No root, no network namespaces.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, ResourceExt};
use mesh_tests::apiserver::{FakeApiServer, Request};
use mesh_tests::watch_tap::BookmarkTap;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

async fn client(url: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&FakeApiServer::kubeconfig(url)).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).expect("client")
}

/// [`client`] with a [`BookmarkTap`] on its responses.
async fn tapped_client(url: &str, tap: &BookmarkTap) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&FakeApiServer::kubeconfig(url)).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    ClientBuilder::try_from(config)
        .expect("client")
        .with_layer(tap)
        .build()
}

fn pod(ns: &str, name: &str, labels: Value, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app:1" }] },
        "status": { "podIP": "10.0.0.1" },
    })
}

fn service(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] },
    })
}

fn rv_of(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_string()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` until it holds (the server runs on its own thread).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A watcher stream driven on its own task (so the test can act on the server meanwhile);
/// dropping it stops the task and so closes the watcher's connection.
struct Events<K> {
    rx: mpsc::UnboundedReceiver<Result<Event<K>, watcher::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Events<K> {
    async fn recv(&mut self) -> Option<Result<Event<K>, watcher::Error>> {
        self.rx.recv().await
    }
}

impl<K> Drop for Events<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_stream<K, S>(stream: S) -> Events<K>
where
    K: Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    Events { rx, task }
}

async fn next<K>(events: &mut Events<K>) -> Result<Event<K>, watcher::Error> {
    within("a watcher event", events.recv())
        .await
        .expect("watcher stream ended")
}

async fn next_ok<K>(events: &mut Events<K>) -> Event<K> {
    loop {
        if let Ok(ev) = next(events).await {
            return ev;
        }
    }
}

/// Consumes Init, InitApply* and InitDone; returns the names listed.
async fn initial_names<K: ResourceExt>(events: &mut Events<K>) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        match next_ok(events).await {
            Event::Init => names.clear(),
            Event::InitApply(o) => names.push(o.name_any()),
            Event::InitDone => return names,
            Event::Apply(o) | Event::Delete(o) => {
                panic!("live event for {} before InitDone", o.name_any())
            }
        }
    }
}

fn describe(ev: &Event<Pod>) -> String {
    match ev {
        Event::Apply(p) => format!("apply {} {}", p.name_any(), p.resource_version().unwrap()),
        Event::Delete(p) => format!("delete {} {}", p.name_any(), p.resource_version().unwrap()),
        Event::Init => "init".into(),
        Event::InitApply(p) => format!("init-apply {}", p.name_any()),
        Event::InitDone => "init-done".into(),
    }
}

fn pod_requests(srv: &FakeApiServer) -> Vec<Request> {
    srv.requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect()
}

fn names<K: ResourceExt>(list: &[K]) -> Vec<String> {
    list.iter().map(ResourceExt::name_any).collect()
}

#[tokio::test]
async fn list_pods_with_selectors_and_get() {
    let srv = FakeApiServer::start().unwrap();
    let web = json!({ "app": "web", "tier": "front" });
    srv.apply(pod("ns1", "a", web.clone(), "node-a"));
    srv.apply(pod("ns1", "b", json!({ "app": "db" }), "node-b"));
    srv.apply(pod("ns2", "c", web, "node-a"));
    srv.apply(pod("ns2", "d", json!({}), "node-b"));
    let client = client(&srv.url()).await;
    let all: Api<Pod> = Api::all(client.clone());

    let list = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&list.items), ["a", "b", "c", "d"]);
    assert_eq!(
        list.metadata.resource_version.as_deref(),
        Some(srv.resource_version().to_string().as_str())
    );
    assert!(list.items[0].metadata.uid.is_some());
    assert!(list.items[0].metadata.creation_timestamp.is_some());

    let cases = [
        ("app=web", "", vec!["a", "c"]),
        ("app!=web", "", vec!["b", "d"]),
        ("app", "", vec!["a", "b", "c"]),
        ("app=web,tier=front", "", vec!["a", "c"]),
        ("app in (db,web),tier notin (back)", "", vec!["a", "b", "c"]),
        ("", "spec.nodeName=node-a", vec!["a", "c"]),
        ("", "spec.nodeName!=node-a", vec!["b", "d"]),
        ("", "metadata.name=b", vec!["b"]),
        ("", "metadata.namespace=ns2,spec.nodeName=node-b", vec!["d"]),
        (
            "app=web",
            "spec.nodeName=node-a,metadata.namespace=ns1",
            vec!["a"],
        ),
    ];
    for (labels, fields, want) in cases {
        let mut lp = ListParams::default();
        if !labels.is_empty() {
            lp = lp.labels(labels);
        }
        if !fields.is_empty() {
            lp = lp.fields(fields);
        }
        let got = all.list(&lp).await.unwrap();
        assert_eq!(
            names(&got.items),
            want,
            "labels {labels:?} fields {fields:?}"
        );
    }

    let ns2: Api<Pod> = Api::namespaced(client.clone(), "ns2");
    assert_eq!(
        names(&ns2.list(&ListParams::default()).await.unwrap().items),
        ["c", "d"]
    );
    let c = ns2.get("c").await.unwrap();
    assert_eq!(c.spec.unwrap().node_name.as_deref(), Some("node-a"));
    match ns2.get("a").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }

    let req = srv
        .requests()
        .into_iter()
        .find(|r| r.query.contains("labelSelector"))
        .unwrap();
    assert_eq!((req.method.as_str(), req.watch), ("GET", false));
    assert_eq!(req.param("labelSelector").as_deref(), Some("app=web"));
}

#[tokio::test]
async fn paginated_list_with_limit_2() {
    let srv = FakeApiServer::start().unwrap();
    for (ns, name) in [
        ("a", "p1"),
        ("a", "p2"),
        ("b", "p1"),
        ("b", "p3"),
        ("c", "p0"),
    ] {
        srv.apply(pod(ns, name, json!({}), "n"));
    }
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client.clone());

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(&first.items), ["p1", "p2"]);
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();
    let token = first.metadata.continue_.clone().expect("continue token");

    // Changes between pages do not show: the pages come from one consistent snapshot.
    assert!(srv.delete("v1", "Pod", Some("b"), "p3"));
    srv.apply(pod("b", "p2", json!({}), "n"));
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        second.metadata.resource_version.as_deref(),
        Some(snapshot_rv.as_str())
    );
    let keys: Vec<_> = second
        .items
        .iter()
        .map(|p| format!("{}/{}", p.namespace().unwrap(), p.name_any()))
        .collect();
    assert_eq!(keys, ["b/p1", "b/p3"]);
    let token2 = second
        .metadata
        .continue_
        .clone()
        .expect("second continue token");
    let third = pods
        .list(&ListParams::default().limit(2).continue_token(&token2))
        .await
        .unwrap();
    assert_eq!(names(&third.items), ["p0"]);
    assert_eq!(third.metadata.continue_, None);

    // A continue token from before a compaction has expired.
    srv.compact();
    match pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }

    // The watcher pages through the current five pods with its page size.
    let mut events = spawn_stream(watcher(pods, watcher::Config::default().page_size(2)));
    let mut listed = initial_names(&mut events).await;
    listed.sort();
    assert_eq!(listed, ["p0", "p1", "p1", "p2", "p2"]);
    let lists: Vec<_> = pod_requests(&srv)
        .into_iter()
        .filter(|r| r.is_list() && r.param("limit").as_deref() == Some("2"))
        .skip(4) // the four manual lists above
        .collect();
    assert_eq!(lists.len(), 3, "{lists:#?}");
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some());
    assert!(lists[2].param("continue").is_some());
}

#[tokio::test]
async fn watcher_sees_add_modify_delete() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(pod("default", "p0", json!({ "app": "web" }), "n1"));
    let list_rv = srv.resource_version().to_string();
    let client = client(&srv.url()).await;
    let mut events = spawn_stream(watcher(Api::<Pod>::all(client), watcher::Config::default()));
    assert_eq!(initial_names(&mut events).await, ["p0"]);

    // Applied before the watch is open: replayed from the list's resourceVersion.
    let added = srv.apply(pod("default", "p1", json!({ "app": "web" }), "n1"));
    match next_ok(&mut events).await {
        Event::Apply(p) => {
            assert_eq!(p.name_any(), "p1");
            assert_eq!(p.resource_version(), Some(rv_of(&added)));
            assert_eq!(p.metadata.generation, Some(1));
        }
        ev => panic!("expected apply, got {}", describe(&ev)),
    }
    eventually("the watch to open", || srv.open_watches() == 1).await;

    let modified = srv.apply(pod("default", "p1", json!({ "app": "web" }), "n2"));
    match next_ok(&mut events).await {
        Event::Apply(p) => {
            assert_eq!(p.resource_version(), Some(rv_of(&modified)));
            assert_eq!(p.uid(), added["metadata"]["uid"].as_str().map(String::from));
            assert_eq!(p.metadata.generation, Some(2));
            assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("n2"));
        }
        ev => panic!("expected apply, got {}", describe(&ev)),
    }

    assert!(srv.delete("v1", "Pod", Some("default"), "p0"));
    assert!(!srv.delete("v1", "Pod", Some("default"), "p0"));
    match next_ok(&mut events).await {
        Event::Delete(p) => {
            assert_eq!(p.name_any(), "p0");
            assert_eq!(
                p.resource_version(),
                Some(srv.resource_version().to_string())
            );
        }
        ev => panic!("expected delete, got {}", describe(&ev)),
    }
    assert!(srv.get("v1", "Pod", Some("default"), "p0").is_none());

    // What kube's watcher sends: one list (limit=500, no resourceVersion: ListSemantic::MostRecent),
    // then a watch from the list's resourceVersion with bookmarks and the 290 s timeout.
    let reqs = pod_requests(&srv);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert!(reqs[0].is_list());
    assert_eq!(reqs[0].param("limit").as_deref(), Some("500"));
    assert_eq!(reqs[0].resource_version, None);
    assert!(reqs[1].watch);
    assert_eq!(reqs[1].resource_version.as_deref(), Some(list_rv.as_str()));
    assert_eq!(
        reqs[1].param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(reqs[1].param("timeoutSeconds").as_deref(), Some("290"));
}

#[tokio::test]
async fn bookmark_reaches_watches_that_asked_for_them() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(pod("default", "p0", json!({}), "n1"));
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client.clone());

    // Raw watch: the bookmark arrives as an event.
    let mut raw = pods
        .watch(&WatchParams::default(), &srv.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    let mut no_bookmarks = pods
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    match within("initial event", no_bookmarks.next()).await {
        Some(Ok(WatchEvent::Added(p))) => assert_eq!(p.name_any(), "p0"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    eventually("two watches", || srv.open_watches() == 2).await;
    srv.apply(service("default", "s")); // advances the RV, invisible to pod watches
    srv.bookmark();
    let rv = srv.resource_version().to_string();
    match within("bookmark", raw.next()).await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(b.types.kind, "Pod");
            assert_eq!(b.types.api_version, "v1");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // The watch without allowWatchBookmarks got no bookmark: the next thing it sees is the pod
    // changed after the bookmark was sent (events on one watch arrive in order).
    srv.apply(pod("default", "after-bookmark", json!({}), "n1"));
    match within("the next event", no_bookmarks.next()).await {
        Some(Ok(WatchEvent::Added(p))) => assert_eq!(p.name_any(), "after-bookmark"),
        other => panic!("expected ADDED after-bookmark, got {other:?}"),
    }
    drop((raw, no_bookmarks));
    eventually("watches closed", || srv.open_watches() == 0).await;

    // The watcher resumes from the bookmark's resourceVersion after a dropped connection. The
    // watch is dropped only once the watcher has consumed the bookmark (the tap sees its body
    // asked for more after the bookmark's chunk), so the test cannot race the bookmark.
    let tap = BookmarkTap::default();
    let pods: Api<Pod> = Api::all(tapped_client(&srv.url(), &tap).await);
    let mut events = spawn_stream(watcher(pods, watcher::Config::default()));
    initial_names(&mut events).await;
    eventually("the watcher's watch", || srv.open_watches() == 1).await;
    srv.apply(service("default", "s2"));
    let consumed = tap.consumed();
    srv.bookmark();
    let bookmark_rv = srv.resource_version().to_string();
    eventually("the watcher to consume the bookmark", || {
        tap.consumed() > consumed
    })
    .await;
    srv.drop_watches();
    eventually("the watcher to resume", || {
        pod_requests(&srv)
            .last()
            .is_some_and(|r| r.watch && r.resource_version.as_deref() == Some(bookmark_rv.as_str()))
    })
    .await;
}

#[tokio::test]
async fn compact_then_resume_gets_410_and_relists() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(pod("default", "p0", json!({}), "n1"));
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client.clone());

    // Raw: a watch from an old resourceVersion gets one ERROR event and the stream ends.
    let old = srv.resource_version().to_string();
    srv.apply(service("default", "s"));
    srv.compact();
    let mut raw = pods
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match within("410", raw.next()).await {
        Some(Ok(WatchEvent::Error(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(
                s.message.starts_with("too old resource version"),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    assert!(within("end of stream", raw.next()).await.is_none());
    // ...while one from the current resourceVersion is fine.
    let current = srv.resource_version().to_string();
    let mut ok = pods
        .watch(&WatchParams::default(), &current)
        .await
        .unwrap()
        .boxed();
    srv.apply(pod("default", "p1", json!({}), "n1"));
    match within("ADDED", ok.next()).await {
        Some(Ok(WatchEvent::Added(p))) => assert_eq!(p.name_any(), "p1"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    drop(ok);

    // The watcher: its resume point falls behind (a Service changed, not a Pod), the history is
    // compacted, the connection drops: it gets 410 and starts over with a fresh list.
    let mut events = spawn_stream(watcher(pods, watcher::Config::default()));
    assert_eq!(initial_names(&mut events).await, ["p0", "p1"]);
    eventually("the watcher's watch", || srv.open_watches() == 1).await;
    srv.apply(pod("default", "p2", json!({}), "n1"));
    match next_ok(&mut events).await {
        Event::Apply(p) => assert_eq!(p.name_any(), "p2"),
        ev => panic!("expected apply, got {}", describe(&ev)),
    }
    let resume_rv = srv.resource_version().to_string();
    srv.apply(service("default", "s2"));
    srv.compact();
    let before = srv.requests().len();
    srv.drop_watches();
    match next(&mut events).await {
        Err(watcher::Error::WatchError(s)) => assert_eq!(s.code, 410),
        other => panic!("expected the 410 watch error, got {other:?}"),
    }
    assert_eq!(initial_names(&mut events).await, ["p0", "p1", "p2"]);

    let after: Vec<_> = srv.requests()[before..]
        .iter()
        .filter(|r| r.path == "/api/v1/pods")
        .cloned()
        .collect();
    assert!(after[0].watch, "{after:#?}");
    assert_eq!(
        after[0].resource_version.as_deref(),
        Some(resume_rv.as_str())
    );
    assert!(after[1].is_list(), "a re-list follows the 410: {after:#?}");

    // And the new watch works.
    srv.apply(pod("default", "p3", json!({}), "n1"));
    match next_ok(&mut events).await {
        Event::Apply(p) => assert_eq!(p.name_any(), "p3"),
        ev => panic!("expected apply, got {}", describe(&ev)),
    }
}

#[tokio::test]
async fn dropped_watch_resumes_without_loss_or_duplicates() {
    let srv = FakeApiServer::start().unwrap();
    let client = client(&srv.url()).await;
    let mut events = spawn_stream(watcher(Api::<Pod>::all(client), watcher::Config::default()));
    assert!(initial_names(&mut events).await.is_empty());
    eventually("the watch", || srv.open_watches() == 1).await;

    let mut expected = Vec::new();
    for i in 0..120 {
        let name = format!("p{}", i % 7);
        if i % 11 == 10 {
            srv.delete("v1", "Pod", Some("default"), &name);
            expected.push(format!("delete {name} {}", srv.resource_version()));
        } else {
            let p = srv.apply(pod("default", &name, json!({ "i": i.to_string() }), "n"));
            expected.push(format!("apply {name} {}", rv_of(&p)));
        }
        if i % 9 == 4 {
            srv.drop_watches();
        }
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let ev = next_ok(&mut events).await;
        seen.push(describe(&ev));
    }
    assert_eq!(seen, expected);
    // Nothing more arrives (the next event is a marker applied now: no duplicate or stray event
    // came before it), and there was never a re-list.
    let marker = srv.apply(pod("default", "marker", json!({}), "n"));
    assert_eq!(
        describe(&next_ok(&mut events).await),
        format!("apply marker {}", rv_of(&marker))
    );
    let reqs = pod_requests(&srv);
    assert_eq!(reqs.iter().filter(|r| r.is_list()).count(), 1);
    let watches = reqs.iter().filter(|r| r.watch).count();
    assert!(
        watches >= 5,
        "expected several resumed watches, got {watches}"
    );
}

#[tokio::test]
async fn slow_watch_is_closed_instead_of_buffering() {
    let srv = FakeApiServer::start().unwrap();
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client);
    let rv = srv.resource_version().to_string();
    let mut stalled = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    eventually("the watch", || srv.open_watches() == 1).await;
    // Far more than socket buffers plus the server's per-watch buffer hold, never read.
    let padding = "x".repeat(4096);
    let total = 8000;
    for i in 0..total {
        let mut p = pod("default", "p", json!({}), "n");
        p["metadata"]["annotations"] = json!({ "pad": padding, "i": i.to_string() });
        srv.apply(p);
        if srv.open_watches() == 0 {
            break;
        }
    }
    assert_eq!(srv.open_watches(), 0, "the stalled watch was not closed");
    // The client gets what was in flight, then the stream ends (like a dropped connection).
    let mut received = 0;
    within("the closed stream to end", async {
        while let Some(ev) = stalled.next().await {
            if ev.is_ok() {
                received += 1;
            }
        }
    })
    .await;
    assert!(received > 0 && received < total, "received {received}");
}

#[tokio::test]
async fn label_selector_watch_sees_objects_leave_and_return() {
    let srv = FakeApiServer::start().unwrap();
    let client = client(&srv.url()).await;
    let config = watcher::Config::default()
        .labels("app=web")
        .fields("spec.nodeName=n1");
    let mut events = spawn_stream(watcher(Api::<Pod>::all(client), config));
    assert!(initial_names(&mut events).await.is_empty());
    eventually("the watch", || srv.open_watches() == 1).await;

    srv.apply(pod("default", "other", json!({ "app": "db" }), "n1"));
    srv.apply(pod("default", "elsewhere", json!({ "app": "web" }), "n2"));
    srv.apply(pod("default", "p", json!({ "app": "web" }), "n1"));
    let mut seen = vec![describe(&next_ok(&mut events).await)];
    srv.apply(pod("default", "p", json!({ "app": "db" }), "n1"));
    seen.push(describe(&next_ok(&mut events).await));
    srv.apply(pod("default", "p", json!({ "app": "web" }), "n1"));
    seen.push(describe(&next_ok(&mut events).await));
    srv.delete("v1", "Pod", Some("default"), "p");
    seen.push(describe(&next_ok(&mut events).await));
    let kinds: Vec<_> = seen
        .iter()
        .map(|s| s.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(kinds, ["apply p", "delete p", "apply p", "delete p"]);

    let watch = pod_requests(&srv).into_iter().find(|r| r.watch).unwrap();
    assert_eq!(watch.param("labelSelector").as_deref(), Some("app=web"));
    assert_eq!(
        watch.param("fieldSelector").as_deref(),
        Some("spec.nodeName=n1")
    );
}

#[tokio::test]
async fn injected_failures_retries_and_watcher_backoff() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(pod("default", "p0", json!({}), "n1"));
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client.clone());

    // kube's client retries 503 (and 429, 504) by itself.
    srv.fail_next("/api/v1/pods", 503, 2);
    assert_eq!(
        names(&pods.list(&ListParams::default()).await.unwrap().items),
        ["p0"]
    );
    assert_eq!(pod_requests(&srv).len(), 3);

    // A 500 surfaces as a Status error.
    srv.fail_next("/api/v1/pods", 500, 1);
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"))
        }
        other => panic!("expected 500, got {other:?}"),
    }
    // Other paths are untouched.
    srv.fail_next("/api/v1/namespaces/other/", 500, 5);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // The watcher backs off and retries its list until it gets through.
    srv.fail_next("/api/v1/pods", 500, 2);
    let start = Instant::now();
    let before = pod_requests(&srv).len();
    let mut events = spawn_stream(watcher(pods, watcher::Config::default()).default_backoff());
    // Each attempt starts with Event::Init, then the list: Init, Err, Init, Err, Init, InitApply, InitDone.
    let (mut errors, mut seen) = (0, Vec::new());
    loop {
        match next(&mut events).await {
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) => {
                assert_eq!(s.code, 500);
                errors += 1;
            }
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(Event::InitDone) => break,
            Ok(ev) => seen.push(describe(&ev)),
        }
    }
    assert_eq!(errors, 2);
    assert_eq!(seen, ["init", "init", "init", "init-apply p0"]);
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "backed off: {:?}",
        start.elapsed()
    );
    let lists = pod_requests(&srv)[before..]
        .iter()
        .filter(|r| r.is_list())
        .count();
    assert_eq!(lists, 3);
}

#[tokio::test]
async fn secrets_get_create_conflict_replace_delete() {
    let srv = FakeApiServer::start().unwrap();
    let client = client(&srv.url()).await;
    let secrets: Api<Secret> = Api::namespaced(client, "istio-system");

    match secrets.get("ca").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    assert_eq!(secrets.get_opt("ca").await.unwrap(), None);

    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "ca" },
        "type": "Opaque",
        "data": { "key": "aGVsbG8=" },
    }))
    .unwrap();
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    assert_eq!(created.namespace().as_deref(), Some("istio-system"));
    assert!(created.metadata.uid.is_some());
    let stored = srv.get("v1", "Secret", Some("istio-system"), "ca").unwrap();
    assert_eq!(stored["data"]["key"], "aGVsbG8=");
    let post = srv
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(post.path, "/api/v1/namespaces/istio-system/secrets");

    match secrets.create(&PostParams::default(), &secret).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"))
        }
        other => panic!("expected 409, got {other:?}"),
    }

    // Replace: with the current resourceVersion it works, with a stale one it conflicts.
    let mut update = created.clone();
    update
        .data
        .as_mut()
        .unwrap()
        .insert("key2".into(), k8s_openapi::ByteString(b"x".to_vec()));
    let replaced = secrets
        .replace("ca", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    assert_ne!(replaced.resource_version(), created.resource_version());
    match secrets.replace("ca", &PostParams::default(), &update).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected 409 Conflict, got {other:?}"),
    }

    secrets
        .delete("ca", &DeleteParams::default())
        .await
        .unwrap();
    assert!(srv
        .get("v1", "Secret", Some("istio-system"), "ca")
        .is_none());
}

#[tokio::test]
async fn namespaces_endpointslices_and_istio_resources() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(json!({ "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "prod", "namespace": "ignored", "labels": { "istio.io/dataplane-mode": "ambient" } } }));
    srv.apply(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "web-abc", "namespace": "prod", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.0.0.5"], "conditions": { "ready": true } }],
        "ports": [{ "port": 8080, "protocol": "TCP" }] }));
    srv.apply(
        json!({ "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": { "name": "default", "namespace": "istio-system" },
        "spec": { "mtls": { "mode": "STRICT" } } }),
    );
    let client = client(&srv.url()).await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = namespaces.get("prod").await.unwrap();
    assert_eq!(ns.metadata.namespace, None);
    let ambient = namespaces
        .list(&ListParams::default().labels("istio.io/dataplane-mode=ambient"))
        .await
        .unwrap();
    assert_eq!(names(&ambient.items), ["prod"]);

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "prod");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(
        list.items[0].endpoints.as_ref().unwrap()[0].addresses,
        ["10.0.0.5"]
    );
    assert_eq!(
        names(
            &Api::<EndpointSlice>::all(client.clone())
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
        ),
        ["web-abc"]
    );

    let pa = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication"),
        "peerauthentications",
    );
    let pas: Api<DynamicObject> = Api::all_with(client.clone(), &pa);
    let list = pas.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items[0].data["spec"]["mtls"]["mode"], "STRICT");
    // A namespaced resource has no cluster-wide single-object path.
    assert!(pas.get_opt("default").await.unwrap().is_none());
    let pa_ns: Api<DynamicObject> = Api::namespaced_with(client.clone(), "istio-system", &pa);
    assert_eq!(pa_ns.get("default").await.unwrap().name_any(), "default");

    let ap = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    );
    let aps: Api<DynamicObject> = Api::namespaced_with(client.clone(), "prod", &ap);
    let mut events = spawn_stream(watcher(aps, watcher::Config::default()));
    assert!(initial_names(&mut events).await.is_empty());
    srv.apply(
        json!({ "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": { "name": "other-ns", "namespace": "dev" }, "spec": {} }),
    );
    srv.apply(json!({ "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": { "name": "allow-web", "namespace": "prod" },
        "spec": { "action": "ALLOW", "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/prod/sa/web"] } }] }] } }));
    match next_ok(&mut events).await {
        Event::Apply(o) => {
            assert_eq!(o.name_any(), "allow-web");
            assert_eq!(o.data["spec"]["action"], "ALLOW");
        }
        _ => panic!("expected the prod AuthorizationPolicy"),
    }

    // Unknown resources and paths are 404 Status objects.
    let raw = http::Request::get("/api/v1/nodes")
        .body(Vec::new())
        .unwrap();
    match client.request::<Value>(raw).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test]
async fn streaming_list_and_watch_timeout() {
    let srv = FakeApiServer::start().unwrap();
    srv.apply(pod("default", "p0", json!({}), "n1"));
    srv.apply(pod("default", "p1", json!({}), "n1"));
    let client = client(&srv.url()).await;
    let pods: Api<Pod> = Api::all(client.clone());

    // sendInitialEvents: the initial state comes over the watch, closed by a bookmark.
    let mut events = spawn_stream(watcher(
        pods.clone(),
        watcher::Config::default().streaming_lists(),
    ));
    assert_eq!(initial_names(&mut events).await, ["p0", "p1"]);
    srv.apply(pod("default", "p2", json!({}), "n1"));
    match next_ok(&mut events).await {
        Event::Apply(p) => assert_eq!(p.name_any(), "p2"),
        ev => panic!("expected apply, got {}", describe(&ev)),
    }
    let first = &pod_requests(&srv)[0];
    assert!(first.watch);
    assert_eq!(first.param("sendInitialEvents").as_deref(), Some("true"));
    drop(events);

    // timeoutSeconds ends the stream cleanly (no error), and the watch is unregistered.
    eventually("old watch gone", || srv.open_watches() == 0).await;
    let start = Instant::now();
    let rv = srv.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(within("timeout", stream.next()).await.is_none());
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(srv.open_watches(), 0);
}

#[test]
fn extra_listener_and_shutdown() {
    let srv = FakeApiServer::start().unwrap();
    let extra = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra_url = format!("http://{}", extra.local_addr().unwrap());
    srv.serve_listener(extra).unwrap();
    srv.apply(pod("default", "p0", json!({}), "n1"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let main_url = srv.url();
    assert!(main_url.starts_with("http://127.0.0.1:"));
    rt.block_on(async {
        let pods: Api<Pod> = Api::all(client(&extra_url).await);
        assert_eq!(
            names(&pods.list(&ListParams::default()).await.unwrap().items),
            ["p0"]
        );
        let mut watch = pods
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Added(_)))));
        drop(srv);
        // The open watch ends with the server; new connections are refused.
        within("watch end", async {
            while let Some(ev) = watch.next().await {
                assert!(ev.is_err(), "unexpected event after shutdown");
            }
        })
        .await;
        let mut config = Config::new(main_url.parse().unwrap());
        config.default_retry = false;
        let pods: Api<Pod> = Api::all(Client::try_from(config).unwrap());
        assert!(pods.list(&ListParams::default()).await.is_err());
    });
}
