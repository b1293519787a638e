//! End to end: inbound capture (sk_lookup), PeerAuthentication and L4 AuthorizationPolicy,
//! enforced at the destination on HBONE (with the peer identity) and on plaintext (without).
//! Two nodes, one agent each, real eBPF, real TLS. Needs root.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use mesh_tests::agent::{
    apply_config, eventually, log_time, metric_sum, render_config, write_config, Agent,
    WorkloadSpec,
};
use mesh_tests::apps::{client_with, echo_server, soak, soak_stop, wait_soak_event};
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const T: Duration = Duration::from_secs(15);
const PORT: u16 = 7000;
const OTHER_PORT: u16 = 7001;

struct Mesh {
    agents: Vec<Agent>,
    _servers: HashMap<u16, Proc>,
    config: PathBuf,
    base: String,
    topo: Topology,
}

impl Mesh {
    /// Replaces the policies and waits until both agents have them in force (each logs
    /// `configuration applied` with a newer generation once the state is swapped and live
    /// connections are re-checked).
    fn policies(&self, yaml: &str) -> Result<()> {
        let agents: Vec<&Agent> = self.agents.iter().collect();
        apply_config(
            &agents,
            &self.config,
            &format!("{}policies:\n{yaml}", self.base),
            T,
        )
    }

    fn denials(&self) -> f64 {
        metric_sum(
            &self.agents[1].metrics(&self.topo).expect("metrics"),
            "mesh_policy_denials_total",
            &[("reason", "no_allow_policy_matched")],
        )
    }

    /// Whether `from` can echo through to `server:port`.
    fn reach(&self, from: &str, port: u16) -> bool {
        let addr = format!("{}:{port}", self.topo.pod("server").ip4);
        let r = client_with(&self.topo, from, &addr, 1, 1024, &["--timeout-ms", "4000"])
            .expect("client");
        r["ok"] == true
    }

    fn denial_logged(&self, skip: usize, reason: &str) -> String {
        let line = self.agents[1]
            .wait_log("connection denied by policy", skip, T)
            .expect("denial line");
        assert!(line.contains(reason), "expected {reason:?} in: {line}");
        line
    }
}

/// node1: client (default), other (namespace other), legacy (not enrolled); node2: server.
fn setup() -> Result<Mesh> {
    let topo = Topology::new(&[
        ("node1", &["client", "other", "legacy"]),
        ("node2", &["server"]),
    ])?;
    let base = render_config(
        &topo,
        &[
            WorkloadSpec::mesh("client"),
            WorkloadSpec::in_namespace("other", "other"),
            WorkloadSpec::plain("legacy"),
            WorkloadSpec::mesh("server"),
        ],
    );
    let config = topo.work_dir().join("mesh.yaml");
    write_config(&config, &base)?;
    let mut servers = HashMap::new();
    for port in [PORT, OTHER_PORT] {
        servers.insert(port, echo_server(&topo, "server", port)?);
    }
    let agents = vec![
        Agent::start(&topo, "node1", &config)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    Ok(Mesh {
        agents,
        _servers: servers,
        config,
        base,
        topo,
    })
}

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{ name: {name}, namespace: default }}
    spec:
      selector: {{ matchLabels: {{ app: server }} }}
      action: {action}
      rules:
{rules}"
    )
}

#[test]
fn allow_and_deny_by_principal_namespace_ip_block_and_port() -> Result<()> {
    // Each step's outcome differs from the step before it, so a policy that did not take effect
    // fails the step; every refusal is counted and logged at the destination, one by one.
    let m = setup()?;
    assert!(
        m.reach("client", PORT) && m.reach("other", PORT),
        "no policy: everyone allowed"
    );
    assert_eq!(m.denials(), 0.0);

    m.policies(&policy(
        "by-principal",
        "ALLOW",
        "        - from: [{ source: { principals: [\"cluster.local/ns/default/sa/client\"] } }]\n          to: [{ operation: { ports: [\"7000\"] } }]\n",
    ))?;
    let skip = m.agents[1].log().len();
    assert!(!m.reach("other", PORT), "other's principal is not allowed");
    m.denial_logged(skip, "no ALLOW policy matched");
    assert!(
        m.reach("client", PORT),
        "client's principal is allowed on 7000"
    );
    let skip = m.agents[1].log().len();
    assert!(
        !m.reach("client", OTHER_PORT),
        "port 7001 is not in the rule"
    );
    let line = m.denial_logged(skip, "no ALLOW policy matched");
    assert!(
        line.contains(&format!(":{OTHER_PORT}")),
        "the line names the port: {line}"
    );
    assert_eq!(m.denials(), 2.0);

    m.policies(&policy(
        "by-namespace",
        "ALLOW",
        "        - from: [{ source: { namespaces: [\"other\"] } }]\n",
    ))?;
    let skip = m.agents[1].log().len();
    assert!(
        !m.reach("client", PORT),
        "namespace other only: client now refused"
    );
    m.denial_logged(skip, "no ALLOW policy matched");
    assert!(
        m.reach("other", PORT),
        "namespace other only: other now allowed"
    );
    assert_eq!(m.denials(), 3.0);

    let client_ip = m.topo.pod("client").ip4;
    m.policies(&policy(
        "by-ip",
        "ALLOW",
        &format!("        - from: [{{ source: {{ ipBlocks: [\"{client_ip}/32\"] }} }}]\n"),
    ))?;
    let skip = m.agents[1].log().len();
    assert!(
        !m.reach("other", PORT),
        "ipBlock of client only: other now refused"
    );
    m.denial_logged(skip, "no ALLOW policy matched");
    assert!(
        m.reach("client", PORT),
        "ipBlock of client only: client allowed again"
    );
    assert_eq!(m.denials(), 4.0);
    Ok(())
}

#[test]
fn deny_overrides_allow_and_names_the_rule() -> Result<()> {
    let m = setup()?;
    let allow_all = policy("allow-all", "ALLOW", "        - {}\n");
    let deny_client = policy(
        "deny-client",
        "DENY",
        "        - from: [{ source: { notNamespaces: [\"other\"] } }]\n          to: [{ operation: { ports: [\"7000\"] } }]\n",
    );
    m.policies(&format!("{allow_all}{deny_client}"))?;
    let skip = m.agents[1].log().len();
    assert!(!m.reach("client", PORT));
    m.denial_logged(
        skip,
        "denied by AuthorizationPolicy default/deny-client rules[0]",
    );
    assert!(
        m.reach("client", OTHER_PORT),
        "the DENY rule is for 7000 only"
    );
    assert!(m.reach("other", PORT), "notNamespaces excludes other");
    Ok(())
}

#[test]
fn strict_mtls_rejects_plaintext_while_permissive_lets_it_through() -> Result<()> {
    let m = setup()?;
    // PERMISSIVE (the default): plaintext from a pod outside the mesh is captured and allowed.
    assert!(m.reach("legacy", PORT));
    let none = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("destination_workload", "server"),
    ];
    assert!(eventually(T, || metric_sum(
        &m.agents[1].metrics(&m.topo).unwrap(),
        "istio_tcp_connections_opened_total",
        &none
    ) == 1.0));

    m.policies(
        "  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: { name: strict, namespace: default }
    spec:
      mtls: { mode: STRICT }
",
    )?;
    let skip = m.agents[1].log().len();
    assert!(!m.reach("legacy", PORT), "STRICT rejects plaintext");
    m.denial_logged(skip, "STRICT mTLS: plaintext rejected");
    assert!(m.reach("client", PORT), "mTLS still allowed");

    // The proxy's own connections to the application are never captured: every mesh connection
    // shows up once, as mutual_tls, and plaintext only for legacy's first connection.
    let text = m.agents[1].metrics(&m.topo)?;
    assert_eq!(
        metric_sum(&text, "istio_tcp_connections_opened_total", &none),
        1.0,
        "{text}"
    );
    Ok(())
}

#[test]
fn a_policy_edit_closes_a_live_connection_it_now_denies_within_two_seconds() -> Result<()> {
    let m = setup()?;
    let server = format!("{}:{PORT}", m.topo.pod("server").ip4);
    let traffic = soak(&m.topo, "client", &server, 60_000)?;
    // The long-lived connection is open and echoing before the edit.
    let (_, open) = wait_soak_event(&traffic, "long_lived_open", 0, T)?;
    let local = open["local"].as_str().expect("local address").to_string();
    let skip = m.agents[1].log().len();
    let edited = SystemTime::now();
    m.policies(&policy(
        "deny-client",
        "DENY",
        "        - from: [{ source: { namespaces: [\"default\"] } }]\n",
    ))?;
    // The agent closes it, and says so within 2 s of the edit (its own clock, so the time this
    // test takes to read the log does not count).
    let line = m.agents[1].wait_log("closing a live connection", skip, T)?;
    let closed = log_time(&line).expect("timestamped log line");
    let took = closed
        .duration_since(edited)
        .expect("the connection was closed after the edit");
    assert!(
        took < Duration::from_secs(2),
        "closed {took:?} after the edit: {line}"
    );
    assert!(
        line.contains("denied by AuthorizationPolicy default/deny-client rules[0]")
            && line.contains(&format!("src={}", m.topo.pod("client").ip4))
            && line.contains(&format!("dst={server}")),
        "{line}"
    );
    // The client sees that very connection fail: the first error of the run is on the
    // connection that was open before the edit, after it had exchanged data, and it was cut
    // (read or write failed), not refused at connect.
    let (_, cut) = wait_soak_event(&traffic, "long_lived_error", 0, T)?;
    assert_eq!(cut["local"], local.as_str(), "{cut}");
    assert!(cut["roundtrips"].as_u64().unwrap_or(0) >= 1, "{cut}");
    let error = cut["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("read:") || error.starts_with("write:"),
        "{cut}"
    );
    let seen = UNIX_EPOCH + Duration::from_millis(cut["unix_ms"].as_u64().unwrap_or(0));
    let took = seen
        .duration_since(edited)
        .expect("the client saw the cut after the edit");
    assert!(
        took < Duration::from_secs(2),
        "the client saw the cut {took:?} after the edit"
    );
    // New connections are refused from then on, and none was refused before the edit. (The two
    // soak threads race: a refused new connection may be printed before the cut.)
    wait_soak_event(&traffic, "new_conn_error", 0, T)?;
    let edited_ms = edited.duration_since(UNIX_EPOCH)?.as_millis() as u64;
    for line in traffic.stdout_lines() {
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["event"] == "new_conn_error" {
            assert!(
                event["unix_ms"].as_u64().unwrap_or(0) >= edited_ms,
                "a new connection failed before the edit: {event}"
            );
        }
    }
    soak_stop(traffic)?;
    Ok(())
}

/// sk_lookup links attached to the server pod's network namespace (`bpftool link show`).
fn sk_lookup_links(topo: &Topology) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&topo.pod("server").netns_path)
        .expect("netns")
        .ino();
    let out = topo
        .run_in_node("node2", &["bpftool", "-j", "link", "show"])
        .expect("bpftool");
    let links: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    links
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|l| {
                    l["type"] == "netns" && l["attach_type"] == "sk_lookup" && l["netns_ino"] == ino
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn unenrolling_removes_the_sk_lookup_attachment() -> Result<()> {
    let m = setup()?;
    assert_eq!(
        sk_lookup_links(&m.topo),
        1,
        "server's netns has an sk_lookup link"
    );
    let text = m.base.replace(
        "    labels:\n      app: server\n",
        "    labels:\n      app: server\n      istio.io/dataplane-mode: none\n",
    );
    assert_ne!(text, m.base);
    write_config(&m.config, &text)?;
    m.agents[1].wait_log("unenrolled workload=default/server", 0, T)?;
    assert!(
        eventually(T, || sk_lookup_links(&m.topo) == 0),
        "links: {}",
        sk_lookup_links(&m.topo)
    );
    // Plaintext now reaches the application directly.
    assert!(m.reach("legacy", PORT));
    Ok(())
}
