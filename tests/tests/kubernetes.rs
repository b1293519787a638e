//! End to end in Kubernetes mode: the pods of the netns topology are described only through an
//! API server (the in-process stand-in, `mesh_tests::apiserver`), never through a config file.
//! Two nodes, one agent each in `run --kubernetes`, real eBPF, real TLS. Needs root.
//!
//! The agents also create the mesh CA Secret through the API (`--create-ca-secret`) at the same
//! moment: cross-node mutual TLS working proves both ended up with the one root that won.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use mesh_tests::agent::{eventually, metric_sum, netns_dir, Agent};
use mesh_tests::apiserver::FakeApiServer;
use mesh_tests::apps::{client_with, echo_server};
use mesh_tests::topology::http_get;
use mesh_tests::{Proc, Topology};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const PORT: u16 = 7000;
const VIP: &str = "10.96.0.10";
const API_PORT: u16 = 16443;
const OPENED: &str = "istio_tcp_connections_opened_total";

struct Cluster {
    agents: Vec<Agent>,
    _server: Proc,
    api: FakeApiServer,
    topo: Topology,
}

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let mut labels = json!({ "kubernetes.io/metadata.name": name });
    if let Some(mode) = mode {
        labels["istio.io/dataplane-mode"] = json!(mode);
    }
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
}

/// A Running pod of the topology, as the kubelet would report it.
fn pod(topo: &Topology, name: &str) -> Value {
    let p = topo.pod(name);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "demo", "labels": { "app": name } },
        "spec": {
            "nodeName": p.node,
            "serviceAccountName": name,
            "containers": [{ "name": "app", "image": "mesh-testapp" }],
        },
        "status": {
            "phase": "Running",
            "podIP": p.ip4.to_string(),
            "podIPs": [{ "ip": p.ip4.to_string() }, { "ip": p.ip6.to_string() }],
        },
    })
}

/// Service `server` (VIP:80 -> 7000) and its EndpointSlice, as the endpoint controller writes it.
fn service(topo: &Topology) -> [Value; 2] {
    let server = topo.pod("server");
    [
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "server", "namespace": "demo" },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": VIP,
                "clusterIPs": [VIP],
                "selector": { "app": "server" },
                "ports": [{ "name": "echo", "port": 80, "protocol": "TCP", "targetPort": "echo" }],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "server-abcde",
                "namespace": "demo",
                "labels": { "kubernetes.io/service-name": "server" },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "echo", "port": PORT, "protocol": "TCP" }],
            "endpoints": [{
                "addresses": [server.ip4.to_string()],
                "conditions": { "ready": true },
                "nodeName": server.node,
                "targetRef": { "kind": "Pod", "name": "server", "namespace": "demo" },
            }],
        }),
    ]
}

impl Cluster {
    /// Whether `client` can echo through to `addr`.
    fn reach(&self, addr: &str) -> bool {
        let r = client_with(
            &self.topo,
            "client",
            addr,
            1,
            1024,
            &["--timeout-ms", "4000"],
        )
        .expect("client");
        r["ok"] == true
    }

    fn metrics(&self, i: usize) -> String {
        self.agents[i].metrics(&self.topo).unwrap_or_default()
    }

    fn wait_log(&self, i: usize, needle: &str, skip: usize) {
        self.agents[i].wait_log(needle, skip, T).unwrap();
    }
}

/// A directory holding only this topology's pod namespaces, for the agents' netns discovery.
fn kubeconfig(topo: &Topology) -> Result<PathBuf> {
    let path = topo.work_dir().join("kubeconfig");
    let url = format!("http://127.0.0.1:{API_PORT}");
    std::fs::write(&path, FakeApiServer::kubeconfig(&url))?;
    Ok(path)
}

/// node1: client; node2: server. Namespace `demo` starts without the mesh label.
fn setup() -> Result<Cluster> {
    let topo = Topology::new(&[("node1", &["client"]), ("node2", &["server"])])?;
    let api = FakeApiServer::start()?;
    // Each node reaches "the API server" on its own loopback, as a hostNetwork pod reaches it.
    for node in ["node1", "node2"] {
        let listener = topo.in_node_netns(node, || {
            Ok(std::net::TcpListener::bind(("127.0.0.1", API_PORT))?)
        })?;
        api.serve_listener(listener)?;
    }
    api.apply(namespace("demo", None));
    api.apply(namespace("default", None));
    api.apply(pod(&topo, "client"));
    api.apply(pod(&topo, "server"));
    for obj in service(&topo) {
        api.apply(obj);
    }
    let server = echo_server(&topo, "server", PORT)?;

    let (kubeconfig, netns) = (kubeconfig(&topo)?, netns_dir(&topo)?);
    let ca = ["--create-ca-secret", "default/mesh-ca"];
    // Started together, so both race to create the CA Secret. (Spawned from this thread: an
    // agent dies with the thread that started it.)
    let mut agents = Vec::new();
    for node in ["node1", "node2"] {
        agents.push(Agent::spawn_kubernetes(
            &topo,
            node,
            &kubeconfig,
            &netns,
            &ca,
        )?);
    }
    for agent in &mut agents {
        agent.wait_ready(&topo, T)?;
    }
    Ok(Cluster {
        agents,
        _server: server,
        api,
        topo,
    })
}

fn opened(text: &str, reporter: &str) -> f64 {
    metric_sum(
        text,
        OPENED,
        &[
            ("reporter", reporter),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/client",
            ),
            ("destination_workload", "server"),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

#[test]
fn pods_services_enrollment_and_policy_come_from_the_api_server() -> Result<()> {
    let c = setup()?;
    let server_addr = format!("{}:{PORT}", c.topo.pod("server").ip4);

    // Both agents share the one CA Secret that won the creation race.
    let secret = c.api.get("v1", "Secret", Some("default"), "mesh-ca");
    let secret = secret.expect("an agent created the CA Secret");
    assert!(secret["data"]["ca-key.pem"].is_string(), "{secret}");

    // Namespace not labeled: nothing is captured; the client reaches the server directly.
    assert!(c.reach(&server_addr));
    assert_eq!(opened(&c.metrics(0), "source"), 0.0, "not enrolled yet");
    assert!(
        !c.agents[0].log().iter().any(|l| l.contains("enrolled")),
        "{:?}",
        c.agents[0].log()
    );

    // Label the namespace: both pods enroll live, and traffic now crosses as HBONE.
    let (skip1, skip2) = (c.agents[0].log().len(), c.agents[1].log().len());
    c.api.apply(namespace("demo", Some("ambient")));
    c.wait_log(0, "enrolled", skip1);
    c.wait_log(1, "enrolled", skip2);
    assert!(c.reach(&server_addr), "pod IP through the mesh");
    assert!(
        c.reach(&format!("{VIP}:80")),
        "service VIP through the mesh"
    );
    assert!(
        eventually(T, || opened(&c.metrics(0), "source") == 2.0),
        "{}",
        c.metrics(0)
    );
    assert!(
        eventually(T, || opened(&c.metrics(1), "destination") == 2.0),
        "{}",
        c.metrics(1)
    );
    // The service was resolved: the named targetPort "echo" came from the EndpointSlice.
    let text = c.metrics(0);
    assert!(
        text.contains("destination_service=\"server.demo.svc.cluster.local\""),
        "{text}"
    );

    // A policy created through the API denies the client.
    let skip = c.agents[1].log().len();
    c.api.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "deny-client", "namespace": "demo" },
        "spec": {
            "selector": { "matchLabels": { "app": "server" } },
            "action": "DENY",
            "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/demo/sa/client"] } }] }],
        },
    }));
    assert!(
        eventually(T, || !c.reach(&server_addr)),
        "the DENY policy from the API takes effect"
    );
    c.wait_log(1, "connection denied by policy", skip);
    // Deleting it allows again.
    assert!(c.api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("demo"),
        "deny-client"
    ));
    assert!(eventually(T, || c.reach(&server_addr)), "policy deleted");

    // Pod-level opt-out, then namespace relabel: pods unenroll live.
    let skip = c.agents[0].log().len();
    c.api.apply(namespace("demo", Some("none")));
    c.wait_log(0, "unenrolled", skip);
    let before = opened(&c.metrics(0), "source");
    // A captured connection is counted before any data moves, so once the echo is back the
    // count would already show it.
    assert!(c.reach(&server_addr), "plain TCP again");
    assert_eq!(
        opened(&c.metrics(0), "source"),
        before,
        "no longer captured"
    );
    Ok(())
}

#[test]
fn the_agent_is_not_ready_until_the_api_server_answered_and_survives_its_outages() -> Result<()> {
    let topo = Topology::new(&[("node1", &["client"])])?;
    let api = FakeApiServer::start()?;
    let listener = topo.in_node_netns("node1", || {
        Ok(std::net::TcpListener::bind(("127.0.0.1", API_PORT))?)
    })?;
    api.serve_listener(listener)?;
    api.apply(namespace("demo", Some("ambient")));
    api.apply(pod(&topo, "client"));
    // The first lists fail: the agent must back off, stay not ready, then sync.
    api.fail_next("/api/v1/pods", 500, 3);
    let (kubeconfig, netns) = (kubeconfig(&topo)?, netns_dir(&topo)?);
    let mut agent = Agent::spawn_kubernetes(&topo, "node1", &kubeconfig, &netns, &[])?;
    let not_ready = eventually(T, || {
        matches!(
            http_get(&topo, "node1", "127.0.0.1:15021", "/healthz/ready"),
            Ok((503, body)) if body.contains("initial configuration not applied")
        )
    });
    assert!(not_ready, "503 while the API server fails the pod list");
    agent.wait_ready(&topo, T)?;
    agent.wait_log("enrolled", 0, T)?;
    let pod_lists = api
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.watch)
        .count();
    assert!(pod_lists >= 2, "the failed list was retried");

    // A pod the API shows on this node but whose namespace is nowhere (its sandbox is gone):
    // counted as pending, and the agent stays ready (one pod must not stall a rollout).
    let mut ghost = pod(&topo, "client");
    ghost["metadata"]["name"] = json!("ghost");
    ghost["status"]["podIP"] = json!("10.20.1.250");
    ghost["status"]["podIPs"] = json!([{ "ip": "10.20.1.250" }]);
    api.apply(ghost);
    assert!(
        eventually(T, || metric_sum(
            &agent.metrics(&topo).unwrap_or_default(),
            "mesh_workloads_pending",
            &[]
        ) == 1.0),
        "{}",
        agent.metrics(&topo)?
    );
    let (code, body) = http_get(&topo, "node1", "127.0.0.1:15021", "/healthz/ready")?;
    assert_eq!(code, 200, "{body}");
    assert!(api.delete("v1", "Pod", Some("demo"), "ghost"));

    // Watches dropped and history compacted: every watcher must re-list (its resourceVersion
    // is gone), and the agent keeps its pods wired meanwhile.
    let watches = api.open_watches();
    let (skip, requests) = (agent.log().len(), api.requests().len());
    api.compact();
    api.drop_watches();
    let relisted = |path: &str| {
        api.requests()
            .iter()
            .skip(requests)
            .any(|r| r.path == path && r.is_list())
    };
    assert!(
        eventually(T, || {
            relisted("/api/v1/namespaces")
                && relisted("/api/v1/pods")
                && api.open_watches() == watches
        }),
        "no re-list after the compaction: {:#?}",
        &api.requests()[requests..]
    );
    let text = agent.metrics(&topo)?;
    assert_eq!(
        metric_sum(&text, "mesh_workloads_enrolled", &[]),
        1.0,
        "{text}"
    );
    // A change after the outage still arrives, applied after whatever the re-list brought: so
    // the one unwiring since the outage began is the one this change asked for.
    let relabel = agent.log().len();
    api.apply(namespace("demo", None));
    agent.wait_log("unenrolled", relabel, T)?;
    let unwired: Vec<String> = agent
        .log()
        .into_iter()
        .skip(skip)
        .filter(|l| l.contains("unenrolled"))
        .collect();
    assert_eq!(
        unwired.len(),
        1,
        "a pod was unwired during the outage: {unwired:#?}"
    );
    Ok(())
}

#[test]
fn a_new_agent_takes_over_only_after_its_first_sync_and_fails_no_connection() -> Result<()> {
    let mut c = setup()?;
    c.api.apply(namespace("demo", Some("ambient")));
    c.wait_log(0, "enrolled", 0);
    c.wait_log(1, "enrolled", 0);
    let server_addr = format!("{}:{PORT}", c.topo.pod("server").ip4);
    let soak = mesh_tests::apps::soak_with(
        &c.topo,
        "client",
        &server_addr,
        600_000,
        &["--long-lived", "0", "--workers", "2", "--interval-ms", "5"],
    )?;
    std::thread::sleep(Duration::from_millis(500));

    // The new agent's first pod list is held: it must wait, and the old agent keep serving.
    c.api.hold("GET", "/api/v1/pods");
    let (kubeconfig, netns) = (kubeconfig(&c.topo)?, netns_dir(&c.topo)?);
    let ca = ["--create-ca-secret", "default/mesh-ca"];
    let mut new = Agent::spawn_kubernetes(&c.topo, "node1", &kubeconfig, &netns, &ca)?;
    new.wait_log("taking over after the first full sync", 0, T)?;
    assert!(
        eventually(T, || c.api.held() >= 1),
        "the new agent lists pods"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !c.agents[0].log().iter().any(|l| l.contains("handed over")),
        "handed over before the new agent synced"
    );
    c.api.release();
    new.wait_log("took the listening sockets over", 0, T)?;
    c.agents[0].wait_log("handed over to the new agent", 0, T)?;
    new.wait_ready(&c.topo, T)?;
    std::thread::sleep(Duration::from_millis(500));

    let r = mesh_tests::apps::soak_stop(soak)?;
    assert_eq!(r["new_conns_failed"], 0, "{r}");
    assert!(r["new_conns_ok"].as_u64().unwrap_or_default() > 50, "{r}");
    let mut old = std::mem::replace(&mut c.agents[0], new);
    let status = old.proc.wait_exit(T)?;
    assert!(status.success(), "{status}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The waypoint in Kubernetes mode

const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";

fn route(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": GATEWAY_API, "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "demo" },
        "spec": spec,
    })
}

fn plain_service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": "demo" },
        "spec": { "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                  "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] },
    })
}

/// `(status, reason, message)` of condition `kind` in the route's status entry that this
/// project's controller wrote for the parent named `parent`, once there is one.
fn route_condition(
    api: &FakeApiServer,
    route: &str,
    parent: &str,
    kind: &str,
) -> Option<[String; 3]> {
    let obj = api.get(GATEWAY_API, "HTTPRoute", Some("demo"), route)?;
    let entry = obj["status"]["parents"].as_array()?.iter().find(|p| {
        p["controllerName"] == mesh_agent::config::kubernetes::route_status::CONTROLLER_NAME
            && p["parentRef"]["name"] == parent
    })?;
    let c = entry["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?;
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some([text("status"), text("reason"), text("message")])
}

/// `mesh-agent waypoint` without a config file: it finds its Gateway and its pod through the API
/// server, reads the mesh CA from the Secret (never creating one), serves, and writes the status
/// of the HTTPRoutes attached to it: Accepted/ResolvedRefs True for a good route (the entry of
/// another controller kept), ResolvedRefs False/BackendNotFound for a missing backend Service,
/// Accepted False/UnsupportedValue naming the field for a route that fails validation.
#[test]
fn the_waypoint_in_kubernetes_mode_writes_route_status() -> Result<()> {
    let topo = Topology::new(&[("node1", &["wp"])])?;
    let api = FakeApiServer::start()?;
    let listener = topo.in_pod_netns("wp", || {
        Ok(std::net::TcpListener::bind(("127.0.0.1", API_PORT))?)
    })?;
    api.serve_listener(listener)?;
    api.apply(namespace("demo", Some("ambient")));
    // The waypoint's pod: the Gateway's name as label and as service account.
    let mut wp = pod(&topo, "wp");
    wp["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] = json!("wp");
    api.apply(wp);
    let root = mesh_agent::identity::generate_root_pem("cluster.local")?;
    let b64 = |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec()));
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "mesh-ca", "namespace": "default" },
        "data": { "ca-key.pem": b64(&root.key_pem)?, "cert-chain.pem": b64(&root.cert_pem)? },
    }));
    api.apply(json!({
        "apiVersion": GATEWAY_API, "kind": "Gateway",
        "metadata": { "name": "wp", "namespace": "demo",
                      "labels": { "istio.io/waypoint-for": "service" } },
        "spec": { "gatewayClassName": "istio-waypoint",
                  "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
    }));
    let mut cart = plain_service("cart", "10.96.0.20");
    cart["metadata"]["labels"] = json!({ "istio.io/use-waypoint": "wp" });
    api.apply(cart);
    api.apply(plain_service("cart-v1", "10.96.0.21"));
    api.apply(plain_service("cart-v2", "10.96.0.22"));
    let to_cart = json!([{ "group": "", "kind": "Service", "name": "cart" }]);
    let mut good = route(
        "good",
        json!({ "parentRefs": to_cart,
                "rules": [{ "backendRefs": [{ "name": "cart-v1", "port": 80, "weight": 90 },
                                            { "name": "cart-v2", "port": 80, "weight": 10 }] }] }),
    );
    good["status"] = json!({ "parents": [{
        "parentRef": { "name": "ingress" }, "controllerName": "example.com/gateway",
        "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted",
                         "message": "theirs", "observedGeneration": 1,
                         "lastTransitionTime": "2026-01-01T00:00:00Z" }] }] });
    api.apply(good);
    api.apply(route(
        "missing",
        json!({ "parentRefs": [{ "name": "wp" }],
                "rules": [{ "backendRefs": [{ "name": "cart-v9", "port": 80 }] }] }),
    ));
    api.apply(route(
        "invalid",
        json!({ "parentRefs": to_cart,
                "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": "api" } }],
                            "backendRefs": [{ "name": "cart-v1", "port": 80 }] }] }),
    ));

    let kubeconfig = kubeconfig(&topo)?;
    let mut cmd = std::process::Command::new(mesh_tests::agent_bin());
    cmd.args([
        "waypoint",
        "--name",
        "wp",
        "--namespace",
        "demo",
        "--pod",
        "wp",
    ])
    .args(["--node", "node1", "--ca-secret", "default/mesh-ca"])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    // No CA files here: it must come from the Secret.
    .arg("--state-dir")
    .arg(topo.work_dir().join("no-ca"))
    .env("RUST_LOG", "info");
    let proc = topo.spawn_in_pod("wp", cmd)?;
    proc.wait_for_stderr_line(|l| l.contains("waypoint ready"), T)?;

    let all_written = || {
        route_condition(&api, "good", "cart", "ResolvedRefs").is_some()
            && route_condition(&api, "missing", "wp", "ResolvedRefs").is_some()
            && route_condition(&api, "invalid", "cart", "Accepted").is_some()
    };
    assert!(eventually(T, all_written), "route status not written");
    let condition = |route: &str, parent: &str, kind: &str| {
        route_condition(&api, route, parent, kind).expect("written")
    };

    let [status, reason, _] = condition("good", "cart", "Accepted");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));
    let [status, reason, _] = condition("good", "cart", "ResolvedRefs");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "ResolvedRefs"));
    let good = api
        .get(GATEWAY_API, "HTTPRoute", Some("demo"), "good")
        .unwrap();
    assert_eq!(
        good["status"]["parents"][0]["conditions"][0]["message"], "theirs",
        "the other controller's entry is kept: {good}"
    );

    let [status, reason, message] = condition("missing", "wp", "ResolvedRefs");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "BackendNotFound")
    );
    assert_eq!(
        message,
        "spec.rules[0].backendRefs[0]: Service demo/cart-v9 not found"
    );

    let [status, reason, message] = condition("invalid", "cart", "Accepted");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UnsupportedValue")
    );
    assert!(
        message.starts_with("field `spec.rules[0].matches[0].path.value`:"),
        "{message}"
    );
    let log = proc.stderr_lines().join("\n");
    assert!(
        log.contains("HTTPRoute demo/invalid: field `spec.rules[0].matches[0].path.value`"),
        "{log}"
    );
    Ok(())
}
