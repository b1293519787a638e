//! The agent's Kubernetes layer (`mesh_agent::config::kubernetes::run`) against the in-process
//! API server stand-in: the Configs it publishes, and the State built from them, follow what the
//! API holds through initial sync, add/modify/delete, a namespace relabel, services with
//! EndpointSlices, policies, bookmarks, 410 Gone after a compaction, dropped watches and API
//! errors. No root, no network namespaces.
//!
//! Run: `cargo test -p mesh-tests --test kubernetes_watch`.
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::client::ClientBuilder;
use mesh_agent::config::kubernetes::{self, KubeOptions};
use mesh_agent::model::Mesh;
use mesh_agent::policy::Request as PolicyRequest;
use mesh_agent::state::State;
use mesh_tests::apiserver::{FakeApiServer, Request};
use mesh_tests::watch_tap::BookmarkTap;
use serde_json::{json, Value};
use tokio::sync::watch;

const NODE: &str = "node1";
/// Any single expected change must arrive within this (a bug fails fast, never hangs).
const WAIT: Duration = Duration::from_secs(15);
/// A whole test.
/// The agent's watchers: namespaces, this node's pods, other nodes' pods, services,
/// EndpointSlices, PeerAuthentications, AuthorizationPolicies, Gateways, HTTPRoutes,
/// VirtualServices, DestinationRules.
const WATCHERS: usize = 11;
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

const POLICY_API: &str = "security.istio.io/v1";

// ---------------------------------------------------------------------------------------------
// Objects as the API server would hold them.

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let mut labels = json!({ "kubernetes.io/metadata.name": name });
    if let Some(mode) = mode {
        labels["istio.io/dataplane-mode"] = json!(mode);
    }
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
        "spec": { "finalizers": ["kubernetes"] }, "status": { "phase": "Active" }
    })
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "labels": { "app": name },
            "managedFields": [{ "manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1" }]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": format!("{name}-sa"),
            "containers": [{ "name": "app", "image": "app:1", "ports": [{ "name": "http", "containerPort": 8080 }] }]
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    })
}

fn service(ns: &str, name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" }]
        }
    })
}

fn slice(ns: &str, name: &str, service: &str, pods: &[(&str, &str, bool)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ip, ready)| {
            json!({
                "addresses": [ip], "conditions": { "ready": ready },
                "targetRef": { "kind": "Pod", "namespace": ns, "name": pod }
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": ns, "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }]
    })
}

fn deny_from(ns: &str, name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": POLICY_API, "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "action": "DENY", "rules": [{ "from": [{ "source": { "ipBlocks": [cidr] } }] }] }
    })
}

fn strict(ns: &str) -> Value {
    json!({
        "apiVersion": POLICY_API, "kind": "PeerAuthentication",
        "metadata": { "name": "default", "namespace": ns },
        "spec": { "mtls": { "mode": "STRICT" } }
    })
}

/// A small cluster: an enrolled namespace `shop` with a local and a remote pod, a service over
/// both, and a mesh-wide STRICT PeerAuthentication.
fn seed(server: &FakeApiServer) {
    server.apply(namespace("shop", Some("ambient")));
    server.apply(namespace("legacy", None));
    server.apply(namespace("istio-system", None));
    server.apply(pod("shop", "web-1", NODE, "10.1.0.5"));
    server.apply(pod("shop", "web-2", "node2", "10.2.0.5"));
    server.apply(pod("legacy", "old", NODE, "10.1.0.9"));
    server.apply(service("shop", "web", "10.96.0.10"));
    server.apply(slice(
        "shop",
        "web-abc",
        "web",
        &[("web-1", "10.1.0.5", true), ("web-2", "10.2.0.5", true)],
    ));
    server.apply(strict("istio-system"));
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Agent {
    server: FakeApiServer,
    config: watch::Receiver<Arc<Mesh>>,
    synced: watch::Receiver<bool>,
    /// Every Mesh the agent published, in order.
    seen: Arc<Mutex<Vec<Arc<Mesh>>>>,
    /// Counts the watch bookmarks the agent's client has consumed.
    tap: BookmarkTap,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts `run` against `server`; the channel starts with an empty placeholder Mesh, as the
/// agent's own startup does.
fn start(server: FakeApiServer) -> Agent {
    start_with(server, None)
}

/// [`start`], as the waypoint `route_status_for` (`namespace/name`) when set.
fn start_with(server: FakeApiServer, route_status_for: Option<&str>) -> Agent {
    let tap = BookmarkTap::default();
    let client = ClientBuilder::try_from(kube::Config::new(server.url().parse().unwrap()))
        .expect("kube client")
        .with_layer(&tap)
        .build();
    let (tx, config) = watch::channel(Arc::new(Mesh::default()));
    let (synced_tx, synced) = watch::channel(false);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut recorder = tx.subscribe();
    let record = seen.clone();
    tokio::spawn(async move {
        while recorder.changed().await.is_ok() {
            let c = recorder.borrow_and_update().clone();
            record.lock().unwrap().push(c);
        }
    });
    let opts = KubeOptions {
        node: NODE.into(),
        root_namespace: "istio-system".into(),
        excluded_ports: vec![22],
        route_status_for: route_status_for.map(str::to_string),
        waypoint_only_default: false,
    };
    let task = tokio::spawn(kubernetes::run(client, opts, tx, synced_tx));
    Agent {
        server,
        config,
        synced,
        seen,
        tap,
        task,
    }
}

impl Agent {
    /// Waits until the latest Mesh satisfies `pred`; panics with `what` after `WAIT`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Mesh) -> bool) -> Arc<Mesh> {
        self.until_within(WAIT, what, pred).await
    }

    async fn until_within(
        &mut self,
        wait: Duration,
        what: &str,
        pred: impl Fn(&Mesh) -> bool,
    ) -> Arc<Mesh> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let c = self.config.borrow_and_update().clone();
                if *self.synced.borrow() && pred(&c) {
                    return c;
                }
            }
            match tokio::time::timeout_at(deadline, self.config.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("{what}: the watcher stopped"),
                Err(_) => panic!(
                    "{what}: not seen within {wait:?}; last config: {:#?}",
                    self.config.borrow()
                ),
            }
        }
    }

    async fn synced(&mut self) -> Arc<Mesh> {
        tokio::time::timeout(WAIT, self.synced.wait_for(|s| *s))
            .await
            .expect("initial sync within WAIT")
            .expect("synced sender alive");
        self.config.borrow_and_update().clone()
    }

    fn state(&self) -> State {
        State::from_mesh(&self.config.borrow(), NODE)
    }

    /// A barrier: creates a new namespace `barrier-N`, waits until a Mesh holding it was
    /// published and recorded, and returns how many Configs were published up to and including
    /// that one. Whatever the agent would publish for events it handled before the marker's is
    /// counted by then, so "nothing published in between" is `barrier() == earlier + 1`, with
    /// no sleeping against the debounce.
    async fn barrier(&mut self) -> usize {
        let name = format!("barrier-{}", self.server.resource_version());
        self.server.apply(namespace(&name, None));
        let holds = |c: &Mesh| c.namespaces.iter().any(|n| n.name == name);
        self.until(&format!("namespace {name}"), holds).await;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen.lock().unwrap().iter().position(|c| holds(c)) {
                return i + 1;
            }
            assert!(
                Instant::now() < deadline,
                "{name} published but not recorded"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Requests logged after the first `from` ones.
    fn requests_since(&self, from: usize) -> Vec<Request> {
        self.server.requests().into_iter().skip(from).collect()
    }

    /// Waits until every resource has an open watch again.
    async fn watches_open(&self) {
        let deadline = Instant::now() + WAIT;
        while self.server.open_watches() < WATCHERS {
            assert!(
                Instant::now() < deadline,
                "watches not reopened: {} open",
                self.server.open_watches()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

fn keys(c: &Mesh) -> Vec<String> {
    c.workloads.iter().map(|w| w.key()).collect()
}

fn has(c: &Mesh, key: &str) -> bool {
    c.workloads.iter().any(|w| w.key() == key)
}

fn local_enrolled(c: &Mesh) -> Vec<String> {
    State::from_mesh(c, NODE)
        .local_enrolled()
        .map(|w| w.key())
        .collect()
}

/// Resource paths, as in the request log.
const ALL_PATHS: [&str; 8] = [
    "/api/v1/namespaces",
    "/api/v1/pods",
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/apis/security.istio.io/v1/peerauthentications",
    "/apis/security.istio.io/v1/authorizationpolicies",
    "/apis/networking.istio.io/v1/virtualservices",
    "/apis/networking.istio.io/v1/destinationrules",
];

fn lists(requests: &[Request], path: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.is_list() && r.path == path)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_waits_for_every_resource_then_publishes_one_complete_config() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        // The last resource's first list fails: nothing may be published before it succeeds.
        const AP: &str = "/apis/security.istio.io/v1/authorizationpolicies";
        server.fail_next(AP, 500, 1);
        let mut agent = start(server);
        let config = agent.synced().await;
        // By the time the agent says it is synced, every resource was listed and the policies
        // were listed twice (the failure, then the retry).
        let lists_so_far = agent.server.requests();
        for path in ALL_PATHS {
            assert!(lists(&lists_so_far, path) >= 1, "{path} not listed");
        }
        assert_eq!(lists(&lists_so_far, AP), 2, "{lists_so_far:#?}");
        // Every Mesh ever published is recorded: the first one is the complete one (nothing
        // went out before the failed list was retried), and it was the only one until the
        // barrier's.
        assert_eq!(
            agent.barrier().await,
            2,
            "one Mesh for the whole initial sync"
        );
        assert!(
            Arc::ptr_eq(&agent.seen.lock().unwrap()[0], &config),
            "a config before the initial sync"
        );
        assert_eq!(keys(&config), ["legacy/old", "shop/web-1", "shop/web-2"]);
        assert_eq!(config.excluded_ports, [22]);
        assert_eq!(config.root_namespace, "istio-system");
        assert_eq!(config.policies.len(), 1);
        let web1 = config.workloads.iter().find(|w| w.name == "web-1").unwrap();
        assert_eq!(web1.service_account, "web-1-sa");
        assert_eq!(web1.node, NODE);
        assert_eq!(web1.netns, None);
        assert_eq!(local_enrolled(&config), ["shop/web-1"]);
        let state = agent.state();
        assert_eq!(state.workloads["shop/web-2"].node, "node2");
        assert!(state.workloads["shop/web-2"].enrolled);
        assert!(!state.workloads["legacy/old"].enrolled);

        // Two pod watchers split by node, with bookmarks; every list is followed by a watch.
        let requests = agent.server.requests();
        let selectors: Vec<_> = requests
            .iter()
            .filter(|r| r.path == "/api/v1/pods" && r.is_list())
            .filter_map(|r| r.param("fieldSelector"))
            .collect();
        assert!(
            selectors.contains(&format!("spec.nodeName={NODE}")),
            "{selectors:?}"
        );
        assert!(
            selectors.contains(&format!("spec.nodeName!={NODE}")),
            "{selectors:?}"
        );
        agent.watches_open().await;
        for path in ALL_PATHS {
            let watch = requests
                .iter()
                .chain(agent.server.requests().iter())
                .find(|r| r.watch && r.path == path)
                .cloned()
                .unwrap_or_else(|| panic!("no watch of {path}"));
            assert_eq!(
                watch.param("allowWatchBookmarks").as_deref(),
                Some("true"),
                "{path}"
            );
            assert!(
                watch.resource_version.is_some(),
                "{path} watch without resourceVersion"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_added_modified_and_deleted_follow_the_api() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        agent.synced().await;

        // Pending without an IP: not a workload yet.
        let mut new = pod("shop", "api", NODE, "10.1.0.7");
        new["status"] = json!({ "phase": "Pending" });
        agent.server.apply(new.clone());
        agent
            .server
            .apply(pod("legacy", "marker-1", "node3", "10.3.0.1"));
        let c = agent.until("marker-1", |c| has(c, "legacy/marker-1")).await;
        assert!(!has(&c, "shop/api"));

        // Running with an IP: a local enrolled workload.
        let running = pod("shop", "api", NODE, "10.1.0.7");
        agent.server.apply(running.clone());
        let c = agent.until("api added", |c| has(c, "shop/api")).await;
        assert!(local_enrolled(&c).contains(&"shop/api".to_string()));
        let state = agent.state();
        let ip: IpAddr = "10.1.0.7".parse().unwrap();
        assert_eq!(state.workload_by_ip(ip).unwrap().key(), "shop/api");

        // Modified: opts out by its own label.
        let mut opted_out = running.clone();
        opted_out["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("none");
        agent.server.apply(opted_out);
        let c = agent
            .until("api opted out", |c| {
                c.workloads.iter().any(|w| {
                    w.name == "api"
                        && w.labels.get("istio.io/dataplane-mode").map(String::as_str)
                            == Some("none")
                })
            })
            .await;
        assert!(!local_enrolled(&c).contains(&"shop/api".to_string()));

        // Succeeded: its IP may already belong to another pod; it is gone.
        let mut done = running.clone();
        done["status"]["phase"] = json!("Succeeded");
        agent.server.apply(done);
        agent.until("api succeeded", |c| !has(c, "shop/api")).await;

        // Back, then deleted.
        agent.server.apply(running);
        agent.until("api back", |c| has(c, "shop/api")).await;
        assert!(agent.server.delete("v1", "Pod", Some("shop"), "api"));
        let c = agent.until("api deleted", |c| !has(c, "shop/api")).await;
        assert_eq!(
            keys(&c),
            ["legacy/marker-1", "legacy/old", "shop/web-1", "shop/web-2"]
        );
        // A remote pod deleted too (the second watcher).
        assert!(agent.server.delete("v1", "Pod", Some("shop"), "web-2"));
        agent
            .until("web-2 deleted", |c| !has(c, "shop/web-2"))
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_relabel_enrolls_and_unenrolls_its_pods_live() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        let c = agent.synced().await;
        assert_eq!(local_enrolled(&c), ["shop/web-1"]);

        agent.server.apply(namespace("legacy", Some("ambient")));
        let c = agent
            .until("legacy enrolled", |c| local_enrolled(c).len() == 2)
            .await;
        assert_eq!(local_enrolled(&c), ["legacy/old", "shop/web-1"]);

        agent.server.apply(namespace("shop", None));
        agent
            .until("shop unenrolled", |c| local_enrolled(c) == ["legacy/old"])
            .await;
        assert!(!agent.state().workloads["shop/web-2"].enrolled);

        // An unsupported value is taken as absent, not as a reason to reject everything.
        agent.server.apply(namespace("legacy", Some("sidecar")));
        let c = agent
            .until("legacy unenrolled", |c| local_enrolled(c).is_empty())
            .await;
        assert!(c
            .namespaces
            .iter()
            .all(|n| !n.labels.contains_key("istio.io/dataplane-mode")));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_resolves_through_its_endpointslices() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        agent.synced().await;
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let state = agent.state();
        let web = state.service_by_vip(vip).expect("service web by VIP");
        assert_eq!(web.key(), "shop/web");
        assert_eq!(web.target_port(80), Some(8080), "named targetPort resolved");
        let endpoints: Vec<_> = web.endpoints.iter().map(|w| w.key()).collect();
        assert_eq!(endpoints, ["shop/web-1", "shop/web-2"]);

        // web-2 turns not ready; a new pod and slice join.
        agent.server.apply(slice(
            "shop",
            "web-abc",
            "web",
            &[("web-1", "10.1.0.5", true), ("web-2", "10.2.0.5", false)],
        ));
        agent.server.apply(pod("shop", "web-3", NODE, "10.1.0.6"));
        agent.server.apply(slice(
            "shop",
            "web-def",
            "web",
            &[("web-3", "10.1.0.6", true)],
        ));
        let c = agent
            .until("endpoints updated", |c| {
                c.services[0].endpoints == ["shop/web-1", "shop/web-3"]
            })
            .await;
        assert_eq!(c.services.len(), 1);

        // A second service; then the first deleted.
        agent.server.apply(service("shop", "api", "10.96.0.11"));
        agent.until("api service", |c| c.services.len() == 2).await;
        agent.server.delete("v1", "Service", Some("shop"), "web");
        let c = agent
            .until("web service deleted", |c| {
                c.services.iter().map(|s| s.key()).collect::<Vec<_>>() == ["shop/api"]
            })
            .await;
        assert!(State::from_mesh(&c, NODE).service_by_vip(vip).is_none());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_created_through_the_api_are_enforced_and_a_broken_edit_keeps_the_last_good_one() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        agent.synced().await;
        let src: IpAddr = "10.2.0.5".parse().unwrap();
        let decide = |state: &State| {
            let dst = &state.workloads["shop/web-1"];
            state
                .policies
                .evaluate(&PolicyRequest {
                    dst,
                    dst_ip: "10.1.0.5".parse().unwrap(),
                    dst_port: 8080,
                    src_ip: src,
                    src: None,
                    http: None,
                })
                .is_allowed()
        };
        // Mesh-wide STRICT: plaintext denied; make the namespace PERMISSIVE for the test.
        assert!(!decide(&agent.state()));
        agent.server.apply(json!({
            "apiVersion": POLICY_API, "kind": "PeerAuthentication",
            "metadata": { "name": "default", "namespace": "shop" },
            "spec": { "mtls": { "mode": "PERMISSIVE" } }
        }));
        agent.until("permissive", |c| c.policies.len() == 2).await;
        assert!(decide(&agent.state()));

        agent
            .server
            .apply(deny_from("shop", "deny-node2", "10.2.0.0/16"));
        agent.until("deny policy", |c| c.policies.len() == 3).await;
        let state = agent.state();
        assert_eq!(state.policies.authorization_policies().len(), 1);
        assert!(!decide(&state), "the DENY policy from the API applies");

        // A broken edit (unknown field): the DENY stays in force.
        let mut broken = deny_from("shop", "deny-node2", "10.2.0.0/16");
        broken["spec"]["rules"][0]["from"][0]["source"]["ipBlockz"] = json!(["0.0.0.0/0"]);
        agent.server.apply(broken);
        agent
            .server
            .apply(pod("legacy", "marker", "node3", "10.3.0.1"));
        agent
            .until("marker after broken edit", |c| has(c, "legacy/marker"))
            .await;
        assert!(
            !decide(&agent.state()),
            "a broken edit must not drop the DENY"
        );

        // A broken new object is ignored alone; the rest of the Mesh goes on.
        let mut other = deny_from("shop", "other", "10.9.0.0/16");
        other["spec"]["action"] = json!("AUDIT");
        agent.server.apply(other);
        agent
            .server
            .apply(pod("legacy", "marker-2", "node3", "10.3.0.2"));
        let c = agent.until("marker-2", |c| has(c, "legacy/marker-2")).await;
        assert_eq!(c.policies.len(), 3);

        // Deleted: gone, even though its last version was broken.
        agent.server.delete(
            POLICY_API,
            "AuthorizationPolicy",
            Some("shop"),
            "deny-node2",
        );
        agent.until("deny deleted", |c| c.policies.len() == 2).await;
        assert!(decide(&agent.state()));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_lets_watches_resume_past_a_compaction_without_a_relist() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        agent.synced().await;
        agent.watches_open().await;
        // Changes elsewhere move the cluster's resourceVersion past what most watchers saw.
        agent
            .server
            .apply(pod("legacy", "marker", "node3", "10.3.0.1"));
        agent.until("marker", |c| has(c, "legacy/marker")).await;
        let published = agent.barrier().await;
        let before = agent.server.requests().len();
        let rv = agent.server.resource_version();
        // Compact and cut the watches only once every watcher has consumed its bookmark.
        let consumed = agent.tap.consumed();
        agent.server.bookmark();
        let deadline = Instant::now() + WAIT;
        while agent.tap.consumed() < consumed + WATCHERS {
            assert!(Instant::now() < deadline, "bookmarks not consumed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        agent.server.compact();
        agent.server.drop_watches();
        // Every watcher has a live watch again: any re-list would have come before it.
        agent.watches_open().await;
        let after = agent.requests_since(before);
        for path in ALL_PATHS {
            assert_eq!(
                lists(&after, path),
                0,
                "{path} re-listed despite the bookmark"
            );
        }
        let resumed: Vec<_> = after.iter().filter(|r| r.watch).collect();
        assert!(resumed.len() >= 7, "{after:#?}");
        for r in resumed {
            assert_eq!(
                r.resource_version.as_deref(),
                Some(rv.to_string().as_str()),
                "{} resumed from the bookmark's resourceVersion",
                r.path
            );
        }
        assert_eq!(
            agent.barrier().await,
            published + 1,
            "nothing changed, nothing published (but the barrier)"
        );
        // And the resumed watches deliver.
        agent
            .server
            .apply(pod("legacy", "after", "node3", "10.3.0.2"));
        agent.until("after", |c| has(c, "legacy/after")).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_after_compaction_relists_without_losing_state() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        let baseline = agent.synced().await;
        agent.watches_open().await;
        // Advance the resourceVersion past every watcher's, forget the history, cut the watches:
        // resuming is impossible (410 Expired), every watcher re-lists.
        agent
            .server
            .apply(pod("legacy", "marker", "node3", "10.3.0.1"));
        agent.until("marker", |c| has(c, "legacy/marker")).await;
        let before = agent.server.requests().len();
        // Configs from here on are checked (the recorder may lag: that only checks more).
        let seen_before = agent.seen.lock().unwrap().len();
        agent.server.compact();
        // A change while nobody watches: only the re-list can bring it.
        agent.server.drop_watches();
        assert!(agent.server.delete("v1", "Pod", Some("shop"), "web-2"));
        let c = agent
            .until("web-2 gone after re-list", |c| !has(c, "shop/web-2"))
            .await;
        assert_eq!(keys(&c), ["legacy/marker", "legacy/old", "shop/web-1"]);
        agent.watches_open().await;
        let after = agent.requests_since(before);
        for path in ["/api/v1/namespaces", "/api/v1/services"] {
            assert!(
                lists(&after, path) >= 1,
                "{path} not re-listed after 410: {after:#?}"
            );
        }
        // No Mesh in between lost what was there: every one published since holds the
        // untouched objects.
        for c in agent.seen.lock().unwrap().iter().skip(seen_before) {
            assert!(has(c, "shop/web-1") && has(c, "legacy/old"), "{c:#?}");
            assert_eq!(c.services.len(), baseline.services.len());
            assert_eq!(c.policies.len(), baseline.policies.len());
            assert_eq!(c.namespaces.len(), baseline.namespaces.len());
        }
        assert!(*agent.synced.borrow());
        // Watching again.
        agent.server.apply(namespace("legacy", Some("ambient")));
        agent
            .until("legacy enrolled", |c| {
                local_enrolled(c).contains(&"legacy/old".to_string())
            })
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_resume_from_their_resource_version() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        agent.synced().await;
        agent.watches_open().await;
        let published = agent.barrier().await;
        let before = agent.server.requests().len();
        agent.server.drop_watches();
        agent.watches_open().await;
        let after = agent.requests_since(before);
        for path in ALL_PATHS {
            assert_eq!(
                lists(&after, path),
                0,
                "{path} re-listed after a mere disconnect"
            );
        }
        assert!(after
            .iter()
            .filter(|r| r.watch)
            .all(|r| r.resource_version.is_some()));
        assert_eq!(
            agent.barrier().await,
            published + 1,
            "nothing published on reconnect"
        );
        agent.server.apply(pod("shop", "api", NODE, "10.1.0.7"));
        agent
            .until("api after reconnect", |c| has(c, "shop/api"))
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_back_off_while_the_last_config_stays_in_force() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        let baseline = agent.synced().await;
        agent.watches_open().await;
        let published = agent.barrier().await;
        let before = agent.server.requests().len();
        // The services watcher loses its connection and reconnects into two 500s.
        agent.server.fail_next("/api/v1/services", 500, 2);
        let cut = Instant::now();
        agent.server.drop_watches();
        agent.server.apply(service("shop", "api", "10.96.0.11"));
        let c = agent
            .until_within(Duration::from_secs(40), "service after the errors", |c| {
                c.services.len() == 2
            })
            .await;
        let took = cut.elapsed();
        // kube's default backoff starts at 0.8 s and doubles (with jitter): two failed attempts
        // cost at least 0.8 + 1.6 s.
        assert!(took >= Duration::from_millis(2000), "no backoff: {took:?}");
        let attempts: Vec<_> = agent
            .requests_since(before)
            .into_iter()
            .filter(|r| r.path == "/api/v1/services")
            .collect();
        assert!(attempts.len() >= 3, "{attempts:#?}");
        assert!(
            attempts.iter().all(|r| r.watch),
            "a 500 on a watch must not force a re-list: {attempts:#?}"
        );
        // Nothing was published while the API failed (only the new service, then the
        // barrier), and the agent stayed ready.
        assert_eq!(agent.barrier().await, published + 2);
        assert!(*agent.synced.borrow(), "still ready during API errors");
        assert_eq!(keys(&c), keys(&baseline));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_policy_crd_counts_as_no_policies() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        // 404 for the whole group for a while, as when the CRDs are not installed.
        server.fail_next("/apis/security.istio.io/v1/peerauthentications", 404, 2);
        server.fail_next("/apis/security.istio.io/v1/authorizationpolicies", 404, 2);
        let mut agent = start(server);
        let c = agent.synced().await;
        assert!(has(&c, "shop/web-1"));
        // Once served, the objects come in.
        agent
            .until("policies once served", |c| c.policies.len() == 1)
            .await;
    })
    .await
}

const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";

fn http_route(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": GATEWAY_API, "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "shop" },
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_gateway_api_crd_counts_as_no_waypoints_or_routes() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        // 404 while the Gateway API CRDs are not installed.
        server.fail_next("/apis/gateway.networking.k8s.io/v1/gateways", 404, 2);
        server.fail_next("/apis/gateway.networking.k8s.io/v1/httproutes", 404, 2);
        let mut agent = start(server);
        let c = agent.synced().await;
        assert!(has(&c, "shop/web-1"), "the agent works without them");
        assert!(c.waypoints.is_empty() && c.routes.is_empty());
        // Installed later: taken in by the watchers that kept retrying.
        agent.server.apply(json!({
            "apiVersion": GATEWAY_API, "kind": "Gateway",
            "metadata": { "name": "wp", "namespace": "shop" },
            "spec": { "gatewayClassName": "istio-waypoint",
                      "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
        }));
        agent.server.apply(http_route(
            "r",
            json!({ "parentRefs": [{ "name": "wp" }],
                    "rules": [{ "backendRefs": [{ "name": "web", "port": 80 }] }] }),
        ));
        agent
            .until("waypoint and route once served", |c| {
                c.waypoints.len() == 1 && c.routes.len() == 1
            })
            .await;
    })
    .await
}

const NETWORKING_API: &str = "networking.istio.io/v1";

fn virtual_service(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": NETWORKING_API, "kind": "VirtualService",
        "metadata": { "name": name, "namespace": "shop",
                      "creationTimestamp": "2024-05-01T12:00:00Z" },
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_and_destination_rules_from_the_api_reach_the_state() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        let mut agent = start(server);
        let c = agent.synced().await;
        assert!(c.virtual_services.is_empty() && c.destination_rules.is_empty());

        agent.server.apply(json!({
            "apiVersion": NETWORKING_API, "kind": "DestinationRule",
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": {
                "host": "web.shop.svc.cluster.local",
                "subsets": [{ "name": "one", "labels": { "app": "web-1" } }],
                "trafficPolicy": { "outlierDetection": { "consecutive5xxErrors": 3 } },
            },
        }));
        agent.server.apply(virtual_service(
            "web",
            json!({ "hosts": ["web"],
                    "http": [{ "timeout": "5s",
                               "route": [{ "destination": { "host": "web", "subset": "one" } }] }] }),
        ));
        let c = agent
            .until("VirtualService and DestinationRule", |c| {
                c.virtual_services.len() == 1 && c.destination_rules.len() == 1
            })
            .await;
        assert_eq!(c.virtual_services[0].key(), "shop/web");
        assert_eq!(
            c.virtual_services[0].spec.http[0].timeout,
            Some(Duration::from_secs(5))
        );
        let state = agent.state();
        assert_eq!(state.virtual_services.len(), 1);
        let rule = state.destination_rule_for("shop/web").expect("the rule of shop/web");
        assert_eq!(
            rule.effective_policy(Some("one"), Some(80))
                .outlier_detection
                .map(|o| (o.consecutive_5xx_errors, o.interval)),
            Some((3, Duration::from_secs(10))),
            "read with Istio's defaults filled in"
        );
        // The subset selects web-1: no warning about it.
        assert!(
            !state.policy_warnings.iter().any(|w| w.policy.starts_with("DestinationRule")),
            "{:?}",
            state.policy_warnings
        );

        // A broken new VirtualService is left out alone; the one in force stays.
        agent.server.apply(virtual_service(
            "cors",
            json!({ "hosts": ["web"],
                    "http": [{ "corsPolicy": {}, "route": [{ "destination": { "host": "web" } }] }] }),
        ));
        agent
            .server
            .apply(pod("legacy", "marker", "node3", "10.3.0.1"));
        let c = agent
            .until("marker after the broken VirtualService", |c| {
                has(c, "legacy/marker")
            })
            .await;
        assert_eq!(c.virtual_services.len(), 1);
        assert_eq!(c.virtual_services[0].key(), "shop/web");

        // Deleted: gone.
        agent
            .server
            .delete(NETWORKING_API, "VirtualService", Some("shop"), "web");
        agent
            .server
            .delete(NETWORKING_API, "DestinationRule", Some("shop"), "web");
        agent
            .until("deleted", |c| {
                c.virtual_services.is_empty() && c.destination_rules.is_empty()
            })
            .await;
    })
    .await
}

/// The conditions of `route`'s status entry written by this project for `parent` (a name).
fn conditions(server: &FakeApiServer, route: &str, parent: &str) -> Option<Vec<Value>> {
    let obj = server.get(GATEWAY_API, "HTTPRoute", Some("shop"), route)?;
    let parents = obj.pointer("/status/parents")?.as_array()?.clone();
    parents
        .into_iter()
        .find(|p| {
            p["controllerName"] == kubernetes::route_status::CONTROLLER_NAME
                && p["parentRef"]["name"] == parent
        })
        .and_then(|p| p["conditions"].as_array().cloned())
}

fn condition<'a>(conditions: &'a [Value], kind: &str) -> &'a Value {
    conditions
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {conditions:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_writes_route_status_and_keeps_other_controllers_entries() {
    bounded(async {
        let server = FakeApiServer::start().unwrap();
        seed(&server);
        server.apply(json!({
            "apiVersion": GATEWAY_API, "kind": "Gateway",
            "metadata": { "name": "wp", "namespace": "shop" },
            "spec": { "gatewayClassName": "istio-waypoint",
                      "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
        }));
        let mut cart = service("shop", "cart", "10.96.0.30");
        cart["metadata"]["labels"] = json!({ "istio.io/use-waypoint": "wp" });
        server.apply(cart);
        server.apply(service("shop", "cart-v1", "10.96.0.31"));
        server.apply(service("shop", "cart-v2", "10.96.0.32"));
        let split = json!([{ "backendRefs": [{ "name": "cart-v1", "port": 80, "weight": 90 },
                                             { "name": "cart-v2", "port": 80, "weight": 10 }] }]);
        let mut good = http_route(
            "good",
            json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "cart" },
                                   { "name": "other-gateway" }],
                    "rules": split }),
        );
        good["status"] = json!({ "parents": [{
            "parentRef": { "name": "other-gateway" }, "controllerName": "example.com/other",
            "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted",
                             "message": "", "observedGeneration": 1,
                             "lastTransitionTime": "2026-01-01T00:00:00Z" }] }] });
        server.apply(good);
        server.apply(http_route(
            "missing",
            json!({ "parentRefs": [{ "name": "wp" }],
                    "rules": [{ "backendRefs": [{ "name": "cart-v9", "port": 80 }] }] }),
        ));
        server.apply(http_route(
            "invalid",
            json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "cart" }],
                    "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": "api" } }],
                                "backendRefs": [{ "name": "cart-v1", "port": 80 }] }] }),
        ));
        // Not attached to this waypoint: no entry of ours.
        server.apply(http_route(
            "elsewhere",
            json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }] }),
        ));
        let mut agent = start_with(server, Some("shop/wp"));
        let c = agent.synced().await;
        assert_eq!(c.routes.len(), 3, "the invalid route is left out alone");

        let deadline = Instant::now() + WAIT;
        let all = |s: &FakeApiServer| {
            ["good", "missing", "invalid"]
                .iter()
                .all(|r| conditions(s, r, if *r == "missing" { "wp" } else { "cart" }).is_some())
        };
        while !all(&agent.server) {
            assert!(Instant::now() < deadline, "route status not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let good = conditions(&agent.server, "good", "cart").unwrap();
        let accepted = condition(&good, "Accepted");
        assert_eq!(
            (
                &accepted["status"],
                &accepted["reason"],
                &accepted["observedGeneration"]
            ),
            (&json!("True"), &json!("Accepted"), &json!(1))
        );
        assert!(accepted["lastTransitionTime"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        let resolved = condition(&good, "ResolvedRefs");
        assert_eq!(
            (&resolved["status"], &resolved["reason"]),
            (&json!("True"), &json!("ResolvedRefs"))
        );
        // The other controller's entry is still there, untouched, first.
        let obj = agent
            .server
            .get(GATEWAY_API, "HTTPRoute", Some("shop"), "good")
            .unwrap();
        let parents = obj["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "{parents:?}");
        assert_eq!(parents[0]["controllerName"], "example.com/other");
        assert_eq!(
            parents[0]["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );

        let missing = conditions(&agent.server, "missing", "wp").unwrap();
        assert_eq!(condition(&missing, "Accepted")["status"], "True");
        let resolved = condition(&missing, "ResolvedRefs");
        assert_eq!(
            (&resolved["status"], &resolved["reason"]),
            (&json!("False"), &json!("BackendNotFound"))
        );
        assert_eq!(
            resolved["message"],
            "spec.rules[0].backendRefs[0]: Service shop/cart-v9 not found"
        );

        let invalid = conditions(&agent.server, "invalid", "cart").unwrap();
        let accepted = condition(&invalid, "Accepted");
        assert_eq!(
            (&accepted["status"], &accepted["reason"]),
            (&json!("False"), &json!("UnsupportedValue"))
        );
        let message = accepted["message"].as_str().unwrap();
        assert!(
            message.starts_with("field `spec.rules[0].matches[0].path.value`:"),
            "{message}"
        );

        let elsewhere = agent
            .server
            .get(GATEWAY_API, "HTTPRoute", Some("shop"), "elsewhere")
            .unwrap();
        assert!(elsewhere.get("status").is_none(), "{elsewhere}");

        // Steady: the writes settle (our own status events do not cause more writes), and a
        // condition whose status did not change keeps its lastTransitionTime across a spec edit.
        let since = accepted["lastTransitionTime"].clone();
        let writes = agent.server.status_writes();
        let mut edited = agent
            .server
            .get(GATEWAY_API, "HTTPRoute", Some("shop"), "invalid")
            .unwrap();
        edited["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("ap i");
        agent.server.apply(edited);
        let deadline = Instant::now() + WAIT;
        loop {
            let c = conditions(&agent.server, "invalid", "cart").unwrap();
            let accepted = condition(&c, "Accepted");
            if accepted["observedGeneration"] == 2 {
                assert_eq!(accepted["lastTransitionTime"], since);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "status of generation 2 not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            agent.server.status_writes(),
            writes + 1,
            "one write for one change"
        );
    })
    .await
}
