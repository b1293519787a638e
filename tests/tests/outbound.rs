//! End to end: real eBPF capture, the in-pod outbound listener, and the relay, on a two-node
//! network-namespace topology with one agent per node. Needs root.
//!
//! Topology: node1 holds `client` (enrolled), `legacy` (namespace without the label) and `late`
//! (added to the mesh by a config edit); node2 holds `server` (enrolled) running an echo server.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use mesh_tests::agent::{
    agent_command, apply_config, attached_programs, bpftool_dump, eventually, inspect_maps,
    leftovers, metric_sum, render_config, uninstall, write_config, Agent, WorkloadSpec,
};
use mesh_tests::apps::{accepted_peers, echo_server, soak_stop, wait_accepted, wait_soak_event};
use mesh_tests::process::Stdio2;
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(15);
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";

struct Mesh {
    // Field order is drop order: agents and apps die before the topology is torn down.
    agents: Vec<Agent>,
    server: Proc,
    config: PathBuf,
    topo: Topology,
}

fn workloads(late_enrolled: bool) -> Vec<WorkloadSpec> {
    let mut late = WorkloadSpec::mesh("late");
    if !late_enrolled {
        late = late.label("istio.io/dataplane-mode", "none");
    }
    vec![
        WorkloadSpec::mesh("client"),
        WorkloadSpec::plain("legacy"),
        late,
        WorkloadSpec::mesh("server"),
    ]
}

fn setup() -> Result<Mesh> {
    setup_with(&[])
}

/// [`setup`] with extra `mesh-agent run` arguments for both agents.
fn setup_with(agent_args: &[&str]) -> Result<Mesh> {
    let topo = Topology::new(&[
        ("node1", &["client", "legacy", "late"]),
        ("node2", &["server"]),
    ])?;
    let config = topo.work_dir().join("mesh.yaml");
    write_config(&config, &render_config(&topo, &workloads(false)))?;
    let server = echo_server(&topo, "server", PORT)?;
    let agents = vec![
        Agent::start_with(&topo, "node1", &config, agent_args)?,
        Agent::start_with(&topo, "node2", &config, agent_args)?,
    ];
    Ok(Mesh {
        agents,
        server,
        config,
        topo,
    })
}

fn client(topo: &Topology, pod: &str, addr: &str, conns: usize, bytes: usize) -> Value {
    mesh_tests::apps::client(topo, pod, addr, conns, bytes).expect("client runs")
}

fn soak(topo: &Topology, pod: &str, ms: u64) -> Result<Proc> {
    mesh_tests::apps::soak(topo, pod, &format!("{}:{PORT}", topo.pod("server").ip4), ms)
}

fn opened_from(agent: &Agent, topo: &Topology, workload: &str) -> f64 {
    let text = agent.metrics(topo).expect("metrics");
    metric_sum(&text, OPENED, &[("source_workload", workload)])
}

#[test]
fn echo_through_the_mesh_ipv4_and_ipv6_with_metrics_and_original_peer() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let server = topo.pod("server");
    let client_pod = topo.pod("client");

    for addr in [
        format!("{}:{PORT}", server.ip4),
        format!("[{}]:{PORT}", server.ip6),
    ] {
        let seen = m.server.stdout_lines().len();
        let r = client(topo, "client", &addr, 1, 100_000);
        assert_eq!(r["ok"], true, "{r}");
        // getpeername in the client shows the original destination, not 127.0.0.1:15001.
        assert_eq!(r["peer"], addr.as_str(), "{r}");
        // The server sees the client pod's own address as the source (the inbound proxy keeps it),
        // and the destination's agent logged the tunnel from there.
        let peers = wait_accepted(&m.server, seen, 1);
        assert_eq!(peers.len(), 1, "{peers:?}");
        let want_ip = if addr.starts_with('[') {
            format!("[{}]", client_pod.ip6)
        } else {
            client_pod.ip4.to_string()
        };
        assert!(
            peers[0].starts_with(&format!("{want_ip}:")),
            "server saw {peers:?}, wanted {want_ip}"
        );
        // getsockname in the client shows its pod's address too, not the loopback address of
        // its connection to the proxy.
        let local = r["local"].as_str().unwrap_or_default();
        assert!(
            local.starts_with(&format!("{want_ip}:")),
            "client's local address {local}, wanted {want_ip}"
        );
        let line = m.agents[1].wait_log(&format!("src_addr={want_ip}:"), 0, T)?;
        assert!(line.contains("inbound connection complete"), "{line}");
    }

    // The metrics endpoint proves the proxy carried both connections, with workload labels.
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
    ];
    assert!(
        eventually(T, || {
            let text = node1.metrics(topo).unwrap();
            metric_sum(&text, CLOSED, &labels) == 2.0
        }),
        "{}",
        node1.metrics(topo)?
    );
    let text = node1.metrics(topo)?;
    assert_eq!(metric_sum(&text, OPENED, &labels), 2.0, "{text}");
    assert_eq!(
        metric_sum(&text, "istio_tcp_received_bytes_total", &labels),
        200_000.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "istio_tcp_sent_bytes_total", &labels),
        200_000.0,
        "{text}"
    );

    // One access log line per proxied connection, at close.
    let closes = node1
        .log()
        .iter()
        .filter(|l| {
            l.contains("outbound connection complete") && l.contains("src_workload=default/client")
        })
        .count();
    assert_eq!(closes, 2, "{:#?}", node1.log());
    Ok(())
}

#[test]
fn pods_that_are_not_enrolled_are_not_redirected() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let addr = format!("{}:{PORT}", topo.pod("server").ip4);
    for pod in ["legacy", "late"] {
        let seen = m.server.stdout_lines().len();
        let r = client(topo, pod, &addr, 1, 1000);
        assert_eq!(r["ok"], true, "{r}");
        let peers = wait_accepted(&m.server, seen, 1);
        assert!(
            peers[0].starts_with(&format!("{}:", topo.pod(pod).ip4)),
            "{peers:?}"
        );
        assert_eq!(
            opened_from(node1, topo, pod),
            0.0,
            "{pod} must not go through the proxy"
        );
    }
    Ok(())
}

#[test]
fn hundred_concurrent_connections_move_a_mebibyte_each_way_byte_exact() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let r = client(
        topo,
        "client",
        &format!("{}:{PORT}", topo.pod("server").ip4),
        100,
        1 << 20,
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["conns"], 100, "{r}");
    assert!(eventually(T, || {
        let text = node1.metrics(topo).unwrap();
        metric_sum(&text, CLOSED, &[("source_workload", "client")]) == 100.0
    }));
    let text = node1.metrics(topo)?;
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_received_bytes_total",
            &[("source_workload", "client")]
        ),
        100.0 * (1 << 20) as f64
    );
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_sent_bytes_total",
            &[("source_workload", "client")]
        ),
        100.0 * (1 << 20) as f64
    );
    Ok(())
}

#[test]
fn enrolling_and_unenrolling_by_config_edit_while_traffic_flows() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let server = format!("{}:{PORT}", topo.pod("server").ip4);
    let traffic = soak(topo, "late", 60_000)?;
    wait_soak_event(&traffic, "long_lived_open", 0, T)?;
    assert_eq!(client(topo, "late", &server, 1, 1000)["ok"], true);
    assert_eq!(
        opened_from(node1, topo, "late"),
        0.0,
        "late is not enrolled yet"
    );

    // Enroll: new connections of `late` now go through the proxy.
    apply_config(
        &[node1],
        &m.config,
        &render_config(topo, &workloads(true)),
        T,
    )?;
    assert!(
        eventually(T, || opened_from(node1, topo, "late") > 5.0),
        "late was not enrolled: {:#?}",
        node1.log()
    );

    // Unenroll again: its connections stop going through the proxy.
    let skip = node1.log().len();
    apply_config(
        &[node1],
        &m.config,
        &render_config(topo, &workloads(false)),
        T,
    )?;
    node1.wait_log("unenrolled workload=default/late", skip, T)?;
    // Nothing broke meanwhile; once the soak's connections have all ended (each is counted
    // when its upstream is connected, before any data moves), a new one is not captured.
    let r = soak_stop(traffic)?;
    assert_eq!(r["ok"], true, "traffic broke during enroll/unenroll: {r}");
    assert_eq!(r["long_lived_errors"], 0, "{r}");
    assert_eq!(r["new_conns_failed"], 0, "{r}");
    let before = opened_from(node1, topo, "late");
    assert_eq!(client(topo, "late", &server, 3, 1000)["ok"], true);
    assert_eq!(
        opened_from(node1, topo, "late"),
        before,
        "late still captured after unenroll"
    );
    Ok(())
}

#[test]
fn a_broken_config_edit_is_rejected_and_traffic_continues() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let traffic = soak(topo, "client", 60_000)?;
    wait_soak_event(&traffic, "long_lived_open", 0, T)?;

    let good = render_config(topo, &workloads(false));
    let broken = good.replacen(&topo.pod("client").ip4.to_string(), "10.20.1.300", 1);
    let skip = node1.log().len();
    write_config(&m.config, &broken)?;
    let line = node1.wait_log("rejected config edit", skip, T)?;
    assert!(
        line.contains(&m.config.display().to_string()),
        "names the file: {line}"
    );
    assert!(
        line.contains("workloads[0].ips[0]"),
        "names the field: {line}"
    );
    assert!(line.contains("line 10"), "names the line: {line}");
    let text = node1.metrics(topo)?;
    assert_eq!(
        metric_sum(
            &text,
            "mesh_config_reloads_total",
            &[("result", "rejected")]
        ),
        1.0,
        "{text}"
    );

    // The previous config stays in force: client is still enrolled and served.
    let before = opened_from(node1, topo, "client");
    let r = client(
        topo,
        "client",
        &format!("{}:{PORT}", topo.pod("server").ip4),
        3,
        10_000,
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(eventually(T, || opened_from(node1, topo, "client") >= before + 3.0));
    let r = soak_stop(traffic)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["long_lived_connections"], 1, "{r}");
    assert_eq!(r["new_conns_failed"], 0, "{r}");
    Ok(())
}

#[test]
fn sigterm_drains_and_fails_closed_and_uninstall_leaves_nothing_behind() -> Result<()> {
    let mut m = setup_with(&["--drain-timeout-secs", "60"])?;
    let node1 = m.topo.node("node1").clone();
    // Something is pinned and attached while the agent runs.
    assert!(node1.pin_dir.join("ENROLLED").exists());
    let tree = attached_programs(&m.topo, "node1")?;
    for prog in [
        "mesh_connect4",
        "mesh_connect6",
        "mesh_sockops",
        "mesh_peername4",
        "mesh_peername6",
        "mesh_sockname4",
        "mesh_sockname6",
    ] {
        assert!(tree.contains(prog), "{prog} not attached:\n{tree}");
    }

    let rules = m.topo.run_in_pod("client", &["ip", "rule", "show"])?;
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    assert!(rules.contains("fwmark 0x111/0xfff lookup 133"), "{rules}");
    let out = m
        .topo
        .run_in_pod("client", &["sysctl", "-n", "net.ipv4.tcp_fwmark_accept"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "set while enrolled"
    );

    // A connection open through the mesh at SIGTERM keeps working while the agent drains, and
    // ends cleanly when its client ends it; the agent exits once it is gone, before the drain
    // deadline.
    let held = mesh_tests::apps::soak_with(
        &m.topo,
        "client",
        &format!("{}:{PORT}", m.topo.pod("server").ip4),
        120_000,
        &["--long-lived-only", "--progress-every", "5"],
    )?;
    wait_soak_event(&held, "long_lived_open", 0, T)?;
    m.agents[0].proc.signal(libc::SIGTERM)?;
    let line = m.agents[0].wait_log("shutting down: no new connections, draining", 0, T)?;
    assert!(line.contains("live_connections=1"), "{line}");
    // Round trips reported after the agent said it is draining.
    let seen = held.stdout_lines().len();
    let (i, _) = wait_soak_event(&held, "progress", seen, T)?;
    wait_soak_event(&held, "progress", i + 1, T)?;
    let r = soak_stop(held)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["long_lived_connections"], 1, "{r}");
    let status = m.agents[0].proc.wait_exit(T)?;
    assert!(
        status.success(),
        "agent exit: {status}\n{}",
        m.agents[0].proc.diagnostics()
    );
    let log = m.agents[0].log();
    assert!(
        !log.iter().any(|l| l.contains("drain timeout passed")),
        "{log:#?}"
    );
    assert!(log
        .iter()
        .any(|l| l.contains("the datapath stays attached")));

    // Stopped, the agent left everything attached: the pod fails closed (its connections are
    // refused at once, never sent around the mesh in plaintext).
    assert!(node1.pin_dir.exists());
    let tree = attached_programs(&m.topo, "node1")?;
    assert!(tree.contains("mesh_connect4"), "{tree}");
    let server = format!("{}:{PORT}", m.topo.pod("server").ip4);
    assert_refused(&m.topo, "client", &server)?;

    // `mesh-agent uninstall` is what removes the mesh from the node, and leaves nothing.
    let before = leftovers(&m.topo, "node1", &["client"])?;
    assert!(
        before.len() >= 5,
        "pins, programs, link, rule, sysctls: {before:#?}"
    );
    let out = uninstall(&m.topo, "node1")?;
    assert!(out.contains("removed links/mesh_connect4"), "{out}");
    assert!(
        out.contains("removed the in-pod routes of default/client"),
        "{out}"
    );
    let left = leftovers(&m.topo, "node1", &["client", "legacy", "late"])?;
    assert!(left.is_empty(), "uninstall left: {left:#?}");

    // With the mesh removed, the pod is no longer captured: traffic goes direct.
    let r = client(&m.topo, "client", &server, 1, 1000);
    assert_eq!(r["ok"], true, "{r}");
    Ok(())
}

/// A connection from `from` to `addr` is refused at once (no agent: fail closed).
fn assert_refused(topo: &Topology, from: &str, addr: &str) -> Result<()> {
    let r = mesh_tests::apps::client_with(topo, from, addr, 1, 1000, &["--timeout-ms", "3000"])?;
    assert_eq!(r["ok"], false, "{from} got through with no agent: {r}");
    let error = r["errors"][0].as_str().unwrap_or_default();
    assert!(error.contains("refused"), "{from}: {r}");
    Ok(())
}

fn inspect(topo: &Topology, node: &str, args: &[&str]) -> String {
    inspect_maps(topo, node, args).expect("inspect maps")
}

#[test]
fn inspect_maps_reads_pinned_maps_while_running_and_after_a_crash() -> Result<()> {
    let mut m = setup()?;
    let topo = &m.topo;
    let client_pod = topo.pod("client");

    let json: Value = serde_json::from_str(&inspect(topo, "node1", &["-o", "json"]))?;
    let enrolled = json["ENROLLED"].as_array().expect("ENROLLED rows");
    assert_eq!(enrolled.len(), 1, "{json}");
    assert_eq!(enrolled[0]["workload"], "default/client");
    assert_eq!(enrolled[0]["ipv4"], client_pod.ip4.to_string());
    assert_eq!(enrolled[0]["ipv6"], client_pod.ip6.to_string());

    let table = inspect(topo, "node1", &["ENROLLED"]);
    assert!(
        table.contains("default/client") && table.contains(&client_pod.ip4.to_string()),
        "{table}"
    );
    assert!(!table.contains("SOCK_DST"), "only the named map: {table}");

    // bpftool prints typed fields thanks to BTF.
    let dump = bpftool_dump(topo, "node1", "ENROLLED")?;
    assert!(
        dump.contains("\"ip4\"") && dump.contains("\"name\""),
        "bpftool shows no BTF fields:\n{dump}"
    );

    // A crash (SIGKILL) of both agents leaves everything attached and pinned: inspect still
    // reads the maps, and the pods fail closed. The client's connections are refused at once
    // (redirected to a proxy that is not there), never sent in plaintext; plaintext from a pod
    // outside the mesh to the server is refused at the server's node, never delivered.
    let server = format!("{}:{PORT}", topo.pod("server").ip4);
    for agent in &mut m.agents {
        agent.proc.signal(libc::SIGKILL)?;
        agent.proc.wait_exit(T)?;
    }
    let json: Value = serde_json::from_str(&inspect(topo, "node1", &["-o", "json"]))?;
    assert_eq!(json["ENROLLED"][0]["workload"], "default/client", "{json}");
    let tree = attached_programs(topo, "node1")?;
    assert!(
        tree.contains("mesh_connect4"),
        "programs stay attached:\n{tree}"
    );
    let seen = m.server.stdout_lines().len();
    for from in ["client", "legacy"] {
        assert_refused(topo, from, &server)?;
    }
    assert!(
        accepted_peers(&m.server, seen).is_empty(),
        "plaintext reached the server"
    );

    // New agents take over what the old ones left, without detaching, and serve again.
    let config = m.config.clone();
    let started = std::time::Instant::now();
    m.agents[1] = Agent::start(topo, "node2", &config)?;
    m.agents[0] = Agent::start(topo, "node1", &config)?;
    m.agents[0].wait_log("datapath taken over from a previous agent", 0, T)?;
    let r = client(topo, "client", &server, 1, 1000);
    assert_eq!(r["ok"], true, "{r}");
    eprintln!(
        "service back {:?} after the new agents were started",
        started.elapsed()
    );
    assert!(eventually(T, || opened_from(&m.agents[0], topo, "client") == 1.0));
    // Plaintext from outside the mesh is served again too (PERMISSIVE), through the proxy.
    let r = client(topo, "legacy", &server, 1, 1000);
    assert_eq!(r["ok"], true, "{r}");
    Ok(())
}

#[test]
fn an_invalid_config_at_start_fails_fast_with_the_reason() -> Result<()> {
    let topo = Topology::new(&[("node1", &["client"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    write_config(&config, "workloads:\n  - name: client\n    nod: node1\n")?;
    let cmd = agent_command(&topo, "node1", &config);
    let mut p = topo.spawn_in_node("node1", cmd)?;
    let status = p.wait_exit(T)?;
    assert!(!status.success());
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("unknown field `nod`") && err.contains("line 3"),
        "{err}"
    );
    assert!(
        !topo.node("node1").pin_dir.exists(),
        "nothing pinned for a rejected config"
    );
    Ok(())
}

#[test]
fn readiness_waits_until_every_enrolled_workload_is_wired() -> Result<()> {
    let topo = Topology::new(&[("node1", &["client"])])?;
    // The pod's netns is referenced through a path that does not exist yet, as for a pod whose
    // sandbox is still being created.
    let pending_path = topo.work_dir().join("client-netns");
    let text = render_config(&topo, &[WorkloadSpec::mesh("client")]).replace(
        &topo.pod("client").netns_path.display().to_string(),
        &pending_path.display().to_string(),
    );
    let config = topo.work_dir().join("mesh.yaml");
    write_config(&config, &text)?;

    let cmd = agent_command(&topo, "node1", &config);
    let agent = topo.spawn_in_node("node1", cmd)?;
    let ready = || mesh_tests::http_get(&topo, "node1", "127.0.0.1:15021", "/healthz/ready");
    assert!(
        eventually(T, || ready().is_ok_and(
            |(code, body)| code == 503 && body.contains("default/client")
        )),
        "{:?}",
        ready()
    );
    // Still not ready after the agent has retried (and failed) to wire it.
    let retry = |from| {
        agent.wait_for_line_in(
            Stdio2::Stderr,
            from,
            |l| l.contains("cannot enroll workload"),
            T,
        )
    };
    let (first, _) = retry(0)?;
    retry(first + 1)?;
    assert_eq!(ready()?.0, 503, "not ready while the workload is not wired");

    std::os::unix::fs::symlink(&topo.pod("client").netns_path, &pending_path)?;
    assert!(
        eventually(T, || ready().is_ok_and(|(code, _)| code == 200)),
        "{:?}",
        ready()
    );
    Ok(())
}

#[test]
fn excluded_ports_bypass_the_proxy_and_follow_config_edits() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let addr = format!("{}:{PORT}", topo.pod("server").ip4);
    let config = render_config(topo, &workloads(false));
    apply_config(
        &[node1],
        &m.config,
        &format!("excludedPorts: [{PORT}]\n{config}"),
        T,
    )?;
    node1.wait_log("excluded ports updated", 0, T)?;
    let r = client(topo, "client", &addr, 1, 1000);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        opened_from(node1, topo, "client"),
        0.0,
        "an excluded port went through the proxy"
    );

    let skip = node1.log().len();
    apply_config(&[node1], &m.config, &config, T)?;
    node1.wait_log("excluded ports updated", skip, T)?;
    let r = client(topo, "client", &addr, 1, 1000);
    assert_eq!(r["ok"], true, "{r}");
    assert!(eventually(T, || opened_from(node1, topo, "client") == 1.0));
    Ok(())
}

/// `mesh-agent ebpf-log SWITCH` on node1's pin directory; its output.
fn ebpf_log(topo: &Topology, switch: &str) -> Result<String> {
    let out = std::process::Command::new(mesh_tests::agent_bin())
        .args(["ebpf-log", switch, "--pin-dir"])
        .arg(&topo.node("node1").pin_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ebpf-log {switch}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_programs_debug_log_is_off_by_default_and_switched_at_run_time() -> Result<()> {
    let m = setup()?;
    let (topo, node1) = (&m.topo, &m.agents[0]);
    let addr = format!("{}:{PORT}", topo.pod("server").ip4);
    let decisions = |agent: &Agent| {
        agent
            .log()
            .iter()
            .filter(|l| l.contains("ebpf DEBUG: connect4 netns"))
            .count()
    };
    assert!(ebpf_log(topo, "status")?.starts_with("eBPF debug log off"));
    assert_eq!(client(topo, "client", &addr, 1, 64)["ok"], true);
    let done = node1.wait_log("outbound connection complete", 0, T)?;
    assert_eq!(decisions(node1), 0, "logged while off (after {done})");

    assert!(ebpf_log(topo, "on")?.starts_with("eBPF debug log on"));
    assert_eq!(client(topo, "client", &addr, 1, 64)["ok"], true);
    let line = node1.wait_log("redirected to the proxy", 0, T)?;
    assert!(
        line.contains("connect4 netns") && line.contains(&addr),
        "{line}"
    );
    // In order through the ring buffer: the first connection's record would be in by now.
    assert_eq!(
        decisions(node1),
        1,
        "the connection made while off was logged"
    );

    assert!(ebpf_log(topo, "off")?.starts_with("eBPF debug log off"));
    node1.wait_log("redirected to the proxy", 0, T)?;
    let before = decisions(node1);
    assert_eq!(client(topo, "client", &addr, 1, 64)["ok"], true);
    // Records arrive in order through one ring buffer: once a later connection's record (with
    // the log on again) is in, any record of the one made while off would be in too.
    assert!(ebpf_log(topo, "on")?.starts_with("eBPF debug log on"));
    let mark = node1.log().len();
    assert_eq!(client(topo, "client", &addr, 1, 64)["ok"], true);
    node1.wait_log("redirected to the proxy", mark, T)?;
    assert_eq!(
        decisions(node1),
        before + 1,
        "a connection made while off was logged"
    );
    Ok(())
}
