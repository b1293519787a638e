//! `cargo xtask demo`: two nodes, four pods and a waypoint, one agent per node, real traffic; prints what the
//! mesh did and cleans up. Usage: `mesh-demo deploy/local/demo.yaml` (as root).
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::agent::{
    attached_programs, bpftool_dump, eventually, inspect_maps, metric_sum, uninstall, write_config,
    Agent,
};
use mesh_tests::apps::{accepted_peers, client, client_with, echo_server, wait_accepted, Capture};
use mesh_tests::{agent_bin, http_get, Topology};

#[path = "mesh-demo/waypoint.rs"]
mod waypoint;

const PORT: u16 = 8080;

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Fills the `{{netns POD}}`, `{{ip4 POD}}` and `{{ip6 POD}}` placeholders.
fn render(topo: &Topology, template: &str) -> Result<String> {
    let mut text = template.to_string();
    for pod in topo.pods() {
        text = text
            .replace(
                &format!("{{{{netns {}}}}}", pod.name),
                &pod.netns_path.display().to_string(),
            )
            .replace(&format!("{{{{ip4 {}}}}}", pod.name), &pod.ip4.to_string())
            .replace(&format!("{{{{ip6 {}}}}}", pod.name), &pod.ip6.to_string());
    }
    if let Some(line) = text
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("{{"))
    {
        bail!("unfilled placeholder in the demo config: {}", line.trim());
    }
    Ok(text)
}

fn run() -> Result<()> {
    let template_path = std::env::args()
        .nth(1)
        .context("usage: mesh-demo <deploy/local/demo.yaml>")?;
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {template_path}"))?;

    heading(
        "Topology: a fabric bridge, two nodes, pods in their own network namespaces and cgroups",
    );
    let topo = Topology::new(&[
        ("node1", &["frontend", "batch", "cart-b"]),
        ("node2", &["cart", "waypoint"]),
    ])?;
    for node in topo.nodes() {
        println!(
            "{:<6} netns {:<22} fabric {} / {}",
            node.name, node.netns, node.ip4, node.ip6
        );
        for pod in topo.pods_on(&node.name) {
            println!(
                "  pod {:<9} {:<10} {:<14} netns {}",
                pod.name, pod.ip4, pod.ip6, pod.netns
            );
        }
    }
    let config = topo.work_dir().join("mesh.yaml");
    let rendered = render(&topo, &template)?;
    write_config(&config, &rendered)?;
    println!(
        "config: {template_path} -> {} (shop is enrolled, legacy is not)",
        config.display()
    );

    let server = echo_server(&topo, "cart", PORT)?;
    let server_b = echo_server(&topo, "cart-b", PORT)?;
    println!("cart (node2) and cart-b (node1) run echo servers on :{PORT}; service cart = 10.96.0.10:80 -> both");

    heading("Agents: one per node, inside the node's netns (like a hostNetwork DaemonSet pod)");
    let mut agents = vec![
        Agent::start(&topo, "node1", &config)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    for a in &agents {
        println!(
            "agent on {} is ready (:15021/healthz/ready = 200), pid {}",
            a.node,
            a.proc.pid()
        );
    }
    let tree = attached_programs(&topo, "node1")?;
    println!(
        "bpftool cgroup tree {}:",
        topo.node("node1").cgroup_root.display()
    );
    for line in tree.lines() {
        println!("  {line}");
    }

    heading("Identities: each agent holds short-lived SPIFFE certificates for its pods' service accounts");
    for node in ["node1", "node2"] {
        let (_, body) = http_get(&topo, node, "127.0.0.1:15000", "/certs")?;
        let certs: serde_json::Value = serde_json::from_str(&body)?;
        for c in certs.as_array().into_iter().flatten() {
            let left = c["not_after"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(unix_now());
            println!(
                "{node}: {} serial {} (expires in {}h{:02}m)",
                c["identity"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("?"),
                left / 3600,
                left % 3600 / 60
            );
        }
    }

    heading("Traffic");
    let cart = topo.pod("cart");
    let marker = "SECRET-ORDER-4711";
    let pcap = topo.work_dir().join("fabric.pcap");
    let flows = [
        ("frontend", format!("{}:{PORT}", cart.ip4), 3, 256 * 1024),
        ("frontend", format!("[{}]:{PORT}", cart.ip6), 1, 64 * 1024),
        ("batch", format!("{}:{PORT}", cart.ip4), 1, 64 * 1024),
    ];
    // Each flow sends the marker text as its payload, under a packet capture on the fabric.
    for (from, addr, conns, bytes) in &flows {
        let seen = server.stdout_lines().len();
        let capture = Capture::start(topo.fabric_netns(), "any", &pcap)?;
        let r = client_with(&topo, from, addr, *conns, *bytes, &["--marker", marker])?;
        let captured = capture.finish()?;
        if r["ok"] != true {
            bail!("{from} -> {addr} failed: {r}");
        }
        let leaked = captured
            .windows(marker.len())
            .filter(|w| *w == marker.as_bytes())
            .count();
        let peers = wait_accepted(&server, seen, 1);
        println!(
            "{from:>8} -> {addr:<22} {conns} conn x {bytes} B echoed byte-exact; app's getpeername = {}; cart saw source {}",
            r["peer"].as_str().unwrap_or("?"),
            peers.first().map_or("?", String::as_str)
        );
        println!(
            "{:>12}fabric capture: {} bytes, payload text {marker:?} seen {leaked} times",
            "",
            captured.len()
        );
        if *from == "frontend" && leaked > 0 {
            bail!("plaintext of a mesh connection crossed the fabric");
        }
    }
    println!("frontend is in the mesh: its bytes crossed the fabric as TLS 1.3 to :15008; batch is not: plaintext");

    let before = (server.stdout_lines().len(), server_b.stdout_lines().len());
    let r = client(&topo, "frontend", "10.96.0.10:80", 10, 1024)?;
    let spread = (
        accepted_peers(&server, before.0).len(),
        accepted_peers(&server_b, before.1).len(),
    );
    println!(
        "frontend -> 10.96.0.10:80 (service cart) x10: ok={}; round robin sent {} to cart (node2, cross-node) and {} to cart-b (node1, same node), all over HBONE",
        r["ok"], spread.0, spread.1
    );
    let node1 = &agents[0];
    eventually(Duration::from_secs(10), || {
        node1.metrics(&topo).is_ok_and(|t| {
            metric_sum(
                &t,
                "istio_tcp_connections_closed_total",
                &[("reporter", "source")],
            ) >= 14.0
        })
    });

    heading("Which connections went through the mesh (access logs, one line per connection)");
    for (agent, what) in [
        (&agents[0], "outbound connection complete"),
        (&agents[1], "inbound connection complete"),
    ] {
        for line in agent.log().iter().filter(|l| l.contains(what)).take(5) {
            println!(
                "  {}: {}",
                agent.node,
                line.split_once(" INFO ")
                    .map_or(line.as_str(), |(_, rest)| rest)
            );
        }
    }
    println!("(batch is in namespace legacy without istio.io/dataplane-mode=ambient: not captured, no log line)");

    heading("Metrics (node1 source side and node2 destination side, Istio names and labels)");
    for (agent, reporter) in [(&agents[0], "source"), (&agents[1], "destination")] {
        let text = agent.metrics(&topo)?;
        for line in text.lines().filter(|l| {
            l.starts_with("istio_tcp_connections_opened")
                && l.contains(&format!("reporter=\"{reporter}\""))
        }) {
            println!("  {}: {line}", agent.node);
        }
    }
    let text = node1.metrics(&topo)?;
    for line in text
        .lines()
        .filter(|l| l.starts_with("mesh_hbone_pool") || l.starts_with("mesh_workloads"))
    {
        println!("  node1: {line}");
    }

    heading("Pinned maps: `mesh-agent inspect maps` and `bpftool map dump pinned`");
    let pin_dir = topo.node("node1").pin_dir.clone();
    println!(
        "  $ mesh-agent inspect maps --pin-dir {}",
        pin_dir.display()
    );
    print!("{}", indent(&inspect_maps(&topo, "node1", &[])?));
    println!("  $ bpftool map dump pinned {}/ENROLLED", pin_dir.display());
    print!("{}", indent(&bpftool_dump(&topo, "node1", "ENROLLED")?));

    heading("Live config edits");
    let enrolled = rendered.replacen(
        "  - name: legacy\n",
        "  - name: legacy\n    labels: { istio.io/dataplane-mode: ambient }\n",
        1,
    );
    write_config(&config, &enrolled)?;
    node1.wait_log("enrolled workload=legacy/batch", 0, Duration::from_secs(10))?;
    let r = client(&topo, "batch", &format!("{}:{PORT}", cart.ip4), 1, 1024)?;
    let captured = eventually(Duration::from_secs(5), || {
        node1.metrics(&topo).is_ok_and(|t| {
            metric_sum(
                &t,
                "istio_tcp_connections_opened_total",
                &[("source_workload", "batch")],
            ) >= 1.0
        })
    });
    println!("labelled namespace legacy ambient -> batch enrolled without a restart; its next connection ok={} captured={captured}", r["ok"]);
    let skip = node1.log().len();
    write_config(
        &config,
        &enrolled.replacen(&cart.ip4.to_string(), "10.20.2.300", 1),
    )?;
    let line = node1.wait_log("rejected config edit", skip, Duration::from_secs(10))?;
    println!("a broken edit (bad IP) is rejected, the previous config stays in force:");
    println!(
        "  {}",
        line.split_once(" ERROR ")
            .map_or(line.as_str(), |(_, rest)| rest)
    );
    let r = client(&topo, "frontend", &format!("{}:{PORT}", cart.ip4), 1, 1024)?;
    println!("frontend -> cart still works: ok={}", r["ok"]);

    waypoint::section(&topo, &config, &enrolled)?;

    heading("Policy: STRICT mTLS for shop, and only frontend may call cart (enforced at the destination)");
    let policies = POLICIES.replace("{{ns}}", "shop");
    write_config(&config, &format!("{enrolled}{policies}"))?;
    let node2 = &agents[1];
    node2.wait_log("config file changed", 0, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    print!("{}", indent(&policies));
    for from in ["frontend", "batch"] {
        let skip = node2.log().len();
        let r = client_with(
            &topo,
            from,
            &format!("{}:{PORT}", cart.ip4),
            1,
            1024,
            &["--timeout-ms", "3000"],
        )?;
        let verdict = if r["ok"] == true {
            "allowed"
        } else {
            "refused"
        };
        println!("{from:>8} -> cart:{PORT}: {verdict}");
        if let Some(line) = node2
            .log()
            .iter()
            .skip(skip)
            .find(|l| l.contains("denied by policy"))
        {
            println!(
                "{:>12}node2: {}",
                "",
                line.split_once(" WARN ")
                    .map_or(line.as_str(), |(_, rest)| rest)
            );
        }
    }
    let rendered_config = config.display().to_string();
    for from in ["shop/frontend", "legacy/batch"] {
        let out = topo.run_in_node(
            "node1",
            &[
                agent_bin().to_str().unwrap_or(""),
                "explain",
                "--config",
                &rendered_config,
                "--from",
                from,
                "--to",
                &format!("shop/cart:{PORT}"),
            ],
        )?;
        println!("  $ mesh-agent explain --from {from} --to shop/cart:{PORT}");
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }

    heading("Stop: SIGTERM drains and leaves the pods failing closed; uninstall removes the mesh");
    for a in &mut agents {
        let status = a.stop(Duration::from_secs(15))?;
        println!("agent on {} exited with {status}", a.node);
    }
    let tree = attached_programs(&topo, "node1")?;
    println!(
        "programs still attached on node1 after the stop: {}",
        tree.matches("mesh_").count()
    );
    let r = client_with(
        &topo,
        "frontend",
        &format!("{}:{PORT}", topo.pod("cart").ip4),
        1,
        64,
        &["--timeout-ms", "3000"],
    )?;
    println!(
        "frontend -> cart with no agent running: {}",
        if r["ok"] == true {
            "CONNECTED (fail open!)".to_string()
        } else {
            format!("refused ({})", r["errors"][0].as_str().unwrap_or_default())
        }
    );
    if r["ok"] == true {
        bail!("a pod's connection left the node with no agent running");
    }
    for node in ["node1", "node2"] {
        let out = uninstall(&topo, node)?;
        println!("  $ mesh-agent uninstall   (on {node})");
        print!("{}", indent(&out));
    }
    let pinned_left: Vec<String> = walk(topo.bpffs());
    let tree = attached_programs(&topo, "node1")?;
    let attached = tree.matches("mesh_").count();
    println!("pinned objects left: {pinned_left:?}; programs still attached: {attached}");
    if !pinned_left.is_empty() || attached != 0 {
        bail!("uninstall left state behind");
    }
    let prefix = topo.prefix().to_string();
    drop(agents);
    drop(server);
    drop(server_b);
    drop(topo);
    let left = Topology::leftovers(&prefix);
    println!(
        "topology removed; leftovers: {}",
        if left.is_empty() {
            "none".to_string()
        } else {
            left.join(", ")
        }
    );
    if !left.is_empty() {
        bail!("cleanup left {left:?}");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Every path below `dir` (the private bpffs the agents pinned into), except the kernel's own
/// `maps.debug` / `progs.debug` iterators that every new bpffs mount carries (bpf_preload).
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for entry in entries.filter(|e| !e.file_name().to_string_lossy().ends_with(".debug")) {
        out.push(entry.path().display().to_string());
        if entry.path().is_dir() {
            out.extend(walk(&entry.path()));
        }
    }
    out
}

/// The policies the demo applies after the first traffic (namespace filled in).
const POLICIES: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: { name: strict, namespace: {{ns}} }
    spec:
      mtls: { mode: STRICT }
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: cart-callers, namespace: {{ns}} }
    spec:
      selector: { matchLabels: { app: cart } }
      action: ALLOW
      rules:
        - from: [{ source: { principals: [\"cluster.local/ns/shop/sa/frontend\"] } }]
          to: [{ operation: { ports: [\"8080\"] } }]
";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
