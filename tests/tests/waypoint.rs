//! End to end: a waypoint (`mesh-agent waypoint` in its own pod, no eBPF) in front of a service
//! labelled `istio.io/use-waypoint`. The client's agent tunnels to the waypoint with the service
//! as the CONNECT authority; the waypoint tunnels on to an endpoint with its own identity. Two
//! nodes, one agent each, real eBPF and real TLS. Needs root.
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_tests::agent::{
    eventually, metric_sum, render_config, write_config, Agent, Waypoint, WorkloadSpec,
};
use mesh_tests::apps::{accepted_peers, client, client_with, echo_server};
use mesh_tests::{Proc, Topology};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(15);
const OPENED: &str = "istio_tcp_connections_opened_total";
const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/";

const HTTP_PORT: u16 = 8080;

const SERVICES: &str = "services:
  - name: api
    vips: [10.96.0.22]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server]
    labels: { istio.io/use-waypoint: wp }
  - name: web
    vips: [10.96.0.20]
    ports: [{ port: 80, targetPort: 7000 }]
    endpoints: [server]
    labels: { istio.io/use-waypoint: wp }
  - name: plain
    vips: [10.96.0.21]
    ports: [{ port: 80, targetPort: 7000 }]
    endpoints: [server]
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: default }
    spec: { gatewayClassName: istio-waypoint }
";

struct Mesh {
    // Field order is drop order: processes die before the topology is torn down.
    waypoint: Option<Waypoint>,
    agents: Vec<Agent>,
    server: Proc,
    _http_server: Proc,
    topo: Topology,
}

impl Mesh {
    /// The last log lines of the agents and the waypoint, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            for l in a.log().iter().rev().take(8).rev() {
                out.push_str(&format!("{}: {l}\n", a.node));
            }
        }
        if let Some(w) = &self.waypoint {
            for l in w
                .proc
                .stderr_lines()
                .iter()
                .filter(|l| {
                    l.contains("panicked")
                        || l.contains("budget")
                        || l.contains("WARN")
                        || l.contains("ERROR")
                })
                .take(8)
            {
                out.push_str(&format!("waypoint: {l}\n"));
            }
        }
        out
    }

    fn metrics(&self, node: &str) -> String {
        let agent = self.agents.iter().find(|a| a.node == node).expect("agent");
        agent.metrics(&self.topo).unwrap_or_default()
    }
}

/// node1: client and the waypoint's pod `wp-1` (service account `wp`, as Istio names a
/// waypoint's); node2: server. `extra` is appended to the config.
fn setup(extra: &str) -> Result<Mesh> {
    let topo = Topology::new(&[("node1", &["client", "wp-1"]), ("node2", &["server"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    let specs = [
        WorkloadSpec::mesh("client"),
        WorkloadSpec::mesh("server"),
        WorkloadSpec::mesh("wp-1")
            .label("gateway.networking.k8s.io/gateway-name", "wp")
            .service_account("wp"),
    ];
    write_config(
        &config,
        &format!("{}{SERVICES}{extra}", render_config(&topo, &specs)),
    )?;
    let server = echo_server(&topo, "server", PORT)?;
    let http_server = http_server(&topo, "server", HTTP_PORT, "v1")?;
    let agents = vec![
        Agent::start(&topo, "node1", &config)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    let waypoint = Some(Waypoint::start(&topo, "wp-1", "wp", &config)?);
    Ok(Mesh {
        waypoint,
        agents,
        server,
        _http_server: http_server,
        topo,
    })
}

/// `mesh-testapp http-server` in `pod` on `port`, answering as `name`.
fn http_server(topo: &Topology, pod: &str, port: u16, name: &str) -> Result<Proc> {
    let mut cmd = std::process::Command::new(mesh_tests::testapp_bin());
    cmd.args(["http-server", "--name", name, "--workers", "1"])
        .args(["--listen", &format!("0.0.0.0:{port}")]);
    let p = topo.spawn_in_pod(pod, cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), T)?;
    Ok(p)
}

/// `mesh-testapp http-client` in `pod`; its JSON summary.
fn http_client(topo: &Topology, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
    let bin = mesh_tests::testapp_bin();
    let mut all = vec![bin.to_str().expect("path"), "http-client", "--workers", "1"];
    all.extend_from_slice(args);
    let out = topo.run_in_pod(pod, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout.lines().last().unwrap_or_default(),
    )?)
}

#[test]
fn http_through_the_waypoint_is_served_per_request_over_http1_and_http2() -> Result<()> {
    let m = setup("")?;
    let url = "http://10.96.0.22:80/hello?x=1";
    for extra in [&[][..], &["--http2"][..]] {
        let mut args = vec!["--url", url, "--requests", "20", "--concurrency", "2"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
        assert_eq!(r["status"]["200"], 20, "{r}");
        assert_eq!(r["served_by"]["v1"], 20, "{r}");
        // The request arrived whole: path, query and host as the client sent them.
        let body: serde_json::Value =
            serde_json::from_str(r["first"]["body"].as_str().unwrap_or_default())?;
        assert_eq!(body["path"], "/hello?x=1", "{body}");
        assert!(
            body["host"]
                .as_str()
                .unwrap_or_default()
                .starts_with("10.96.0.22"),
            "{body}"
        );
    }
    // Every request was logged at the waypoint, with the client's identity.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log(" request ", T)?;
    assert!(
        line.contains(&format!("src_principal={SPIFFE}client")),
        "{line}"
    );
    assert!(line.contains("path=/hello"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    Ok(())
}

#[test]
fn a_denied_http_request_gets_istios_403_at_the_waypoint() -> Result<()> {
    let m = setup(DENY_CLIENT)?;
    let r = http_client(&m.topo, "client", &["--url", "http://10.96.0.22:80/x"])?;
    assert_eq!(r["status"]["403"], 1, "{r}\n{}", m.logs());
    assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(line.contains("deny-client"), "{line}");
    Ok(())
}

#[test]
fn a_service_with_a_waypoint_is_reached_through_it_with_the_waypoint_identity() -> Result<()> {
    let m = setup("")?;
    let wp_principal = format!("{SPIFFE}wp");
    let client_principal = format!("{SPIFFE}client");

    let r = client(&m.topo, "client", "10.96.0.20:80", 2, 64 * 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    // The client's agent tunnelled to the waypoint, expecting the waypoint's identity.
    let to_waypoint = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_principal", wp_principal.as_str()),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node1"), OPENED, &to_waypoint)
            == 2.0),
        "{}",
        m.metrics("node1")
    );
    // The server's agent saw the waypoint, not the client, as the peer.
    let at_server = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_principal", wp_principal.as_str()),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node2"), OPENED, &at_server)
            == 2.0),
        "{}",
        m.metrics("node2")
    );
    // The waypoint counted both as reporter="waypoint" and logged the client's identity.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("waypoint connection complete", T)?;
    assert!(line.contains(&client_principal), "{line}");
    assert!(line.contains("dst=10.96.0.20:80"), "{line}");
    // As Istio reports it: the source is the client the waypoint acts for.
    let through = [
        ("reporter", "waypoint"),
        ("destination_workload", "server"),
        ("source_workload", "client"),
        ("source_principal", client_principal.as_str()),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || {
            metric_sum(&wp.metrics(&m.topo).unwrap_or_default(), OPENED, &through) == 2.0
        }),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );

    // A service without the label is reached directly: the server sees the client.
    let r = client(&m.topo, "client", "10.96.0.21:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}");
    let direct = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_principal", client_principal.as_str()),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node2"), OPENED, &direct)
            == 1.0),
        "{}",
        m.metrics("node2")
    );
    Ok(())
}

#[test]
fn with_the_waypoint_gone_the_client_fails_at_once_and_nothing_goes_around_it() -> Result<()> {
    let mut m = setup("")?;
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}");
    let accepted = accepted_peers(&m.server, 0).len();
    assert_eq!(accepted, 1);

    let mut wp = m.waypoint.take().expect("waypoint");
    wp.proc.kill()?;
    let started = Instant::now();
    let r = client_with(
        &m.topo,
        "client",
        "10.96.0.20:80",
        1,
        1024,
        &["--timeout-ms", "10000"],
    )?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a clear failure, not a hang: {r} after {:?}",
        started.elapsed()
    );
    // Nothing reached the server around the waypoint.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(accepted_peers(&m.server, 0).len(), accepted);
    let failed = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || metric_sum(
            &m.metrics("node1"),
            "istio_tcp_connections_failed_total",
            &failed
        ) >= 1.0),
        "{}",
        m.metrics("node1")
    );
    Ok(())
}

const DENY_CLIENT: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: deny-client, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: DENY
      rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/client] } }] }]
";

#[test]
fn the_waypoint_decides_the_destination_policy_for_the_client_not_for_itself() -> Result<()> {
    // The server's agent sees only the waypoint's identity; the client's is checked at the
    // waypoint, so a DENY on the client's principal cannot be bypassed through the waypoint.
    let m = setup(DENY_CLIENT)?;
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], false, "{r}");
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("connection denied by policy", T)?;
    assert!(
        line.contains("denied by AuthorizationPolicy default/deny-client rules[0]"),
        "{line}"
    );
    assert_eq!(
        accepted_peers(&m.server, 0).len(),
        0,
        "nothing reached the server"
    );
    // Directly (no waypoint) the server's own agent denies it too.
    let r = client(&m.topo, "client", "10.96.0.21:80", 1, 1024)?;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(accepted_peers(&m.server, 0).len(), 0);
    Ok(())
}

const DENIALS: &str = "mesh_policy_denials_total";

/// Bound to the waypoint's Gateway: applies to everything through it.
const NO_DELETE_AT_THE_WAYPOINT: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-delete, namespace: default }
    spec:
      targetRefs: [{ kind: Gateway, group: gateway.networking.k8s.io, name: wp }]
      action: DENY
      rules: [{ to: [{ operation: { methods: [DELETE] } }] }]
";

#[test]
fn a_targetrefs_policy_on_the_waypoint_gateway_denies_delete_with_403() -> Result<()> {
    let m = setup(NO_DELETE_AT_THE_WAYPOINT)?;
    let url = "http://10.96.0.22:80/items/1";
    for extra in [&[][..], &["--http2"][..]] {
        let mut args = vec!["--url", url, "--method", "DELETE"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["status"]["403"], 1, "{r}\n{}", m.logs());
        assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
        let mut args = vec!["--url", url, "--method", "GET"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
        assert_eq!(r["served_by"]["v1"], 1, "{r}");
    }
    // The waypoint's log and metric name the deciding policy and rule.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(
        line.contains("policy=AuthorizationPolicy default/no-delete rules[0]"),
        "{line}"
    );
    assert!(
        line.contains("(targetRefs Gateway default/wp, at waypoint default/wp)"),
        "{line}"
    );
    let by_rule = [
        ("reason", "denied_by_policy"),
        ("policy", "AuthorizationPolicy default/no-delete rules[0]"),
        ("destination_workload", "wp-1"),
    ];
    assert!(
        eventually(T, || metric_sum(
            &wp.metrics(&m.topo).unwrap_or_default(),
            DENIALS,
            &by_rule
        ) == 2.0),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );
    // The server's agent enforces nothing of it: a direct DELETE (no waypoint) is served.
    let direct = format!("http://{}:{HTTP_PORT}/items/1", m.topo.pod("server").ip4);
    let r = http_client(&m.topo, "client", &["--url", &direct, "--method", "DELETE"])?;
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
    Ok(())
}

/// Bound to the Service `api`: applies to requests to it through its waypoint.
const GET_PUBLIC_ON_THE_SERVICE: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: get-public, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: \"\", name: api }]
      action: ALLOW
      rules: [{ to: [{ operation: { methods: [GET], paths: [\"/public/*\"] } }] }]
";

#[test]
fn a_targetrefs_policy_on_the_service_allows_only_get_on_public_paths() -> Result<()> {
    let m = setup(GET_PUBLIC_ON_THE_SERVICE)?;
    let get = |path: &str, method: &str| {
        let url = format!("http://10.96.0.22:80{path}");
        http_client(&m.topo, "client", &["--url", &url, "--method", method])
    };
    let r = get("/public/x", "GET")?;
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
    for (path, method) in [("/private", "GET"), ("/public/x", "POST")] {
        let r = get(path, method)?;
        assert_eq!(r["status"]["403"], 1, "{method} {path}: {r}\n{}", m.logs());
        assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
    }
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(
        line.contains("no ALLOW policy with targetRefs matched at waypoint default/wp"),
        "{line}"
    );
    let no_match = [("reason", "no_allow_policy_matched"), ("policy", "")];
    assert!(
        eventually(T, || metric_sum(
            &wp.metrics(&m.topo).unwrap_or_default(),
            DENIALS,
            &no_match
        ) == 2.0),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );
    // Another service behind the same waypoint is not bound by it.
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    Ok(())
}
