//! End to end: inbound capture (sk_lookup), PeerAuthentication and L4 AuthorizationPolicy,
//! enforced at the destination on HBONE (with the peer identity) and on plaintext (without).
//! Two nodes, one agent each, real eBPF, real TLS. Needs root.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_tests::agent::{eventually, metric_sum, render_config, write_config, Agent, WorkloadSpec};
use mesh_tests::apps::{client_with, echo_server, soak};
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
    /// Replaces the policies and waits until node2's agent applied them.
    fn policies(&self, yaml: &str) -> Result<()> {
        let skip = self.agents[1].log().len();
        write_config(&self.config, &format!("{}policies:\n{yaml}", self.base))?;
        self.agents[1].wait_log("config file changed", skip, T)?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
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
    let m = setup()?;
    assert!(
        m.reach("client", PORT) && m.reach("other", PORT),
        "no policy: everyone allowed"
    );

    m.policies(&policy(
        "by-principal",
        "ALLOW",
        "        - from: [{ source: { principals: [\"cluster.local/ns/default/sa/client\"] } }]\n          to: [{ operation: { ports: [\"7000\"] } }]\n",
    ))?;
    assert!(
        m.reach("client", PORT),
        "client's principal is allowed on 7000"
    );
    let skip = m.agents[1].log().len();
    assert!(!m.reach("other", PORT), "other's principal is not");
    m.denial_logged(skip, "no ALLOW policy matched");
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

    m.policies(&policy(
        "by-namespace",
        "ALLOW",
        "        - from: [{ source: { namespaces: [\"other\"] } }]\n",
    ))?;
    assert!(
        m.reach("other", PORT) && !m.reach("client", PORT),
        "namespace other only"
    );

    let other_ip = m.topo.pod("other").ip4;
    m.policies(&policy(
        "by-ip",
        "ALLOW",
        &format!("        - from: [{{ source: {{ ipBlocks: [\"{other_ip}/32\"] }} }}]\n"),
    ))?;
    assert!(
        m.reach("other", PORT) && !m.reach("client", PORT),
        "ipBlock of other only"
    );

    let text = m.agents[1].metrics(&m.topo)?;
    assert!(
        metric_sum(
            &text,
            "mesh_policy_denials_total",
            &[("reason", "no_allow_policy_matched")]
        ) >= 4.0,
        "{text}"
    );
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
        "denied by AuthorizationPolicy default/deny-client rule 0",
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
    let traffic = soak(
        &m.topo,
        "client",
        &format!("{}:{PORT}", m.topo.pod("server").ip4),
        4000,
    )?;
    std::thread::sleep(Duration::from_millis(800));
    let edited = Instant::now();
    m.policies(&policy(
        "deny-client",
        "DENY",
        "        - from: [{ source: { namespaces: [\"default\"] } }]\n",
    ))?;
    let line = m.agents[1].wait_log("closing a live connection", 0, T)?;
    assert!(
        edited.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        edited.elapsed()
    );
    assert!(
        line.contains("denied by AuthorizationPolicy default/deny-client rule 0"),
        "{line}"
    );
    let r = soak_summary(traffic);
    assert!(
        r["long_lived_errors"].as_u64().unwrap_or(0) >= 1,
        "the long-lived connection was cut: {r}"
    );
    assert!(
        r["new_conns_failed"].as_u64().unwrap_or(0) >= 1,
        "new connections are refused: {r}"
    );
    Ok(())
}

fn soak_summary(p: Proc) -> Value {
    mesh_tests::apps::soak_result(p).expect("soak summary")
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
