//! End to end: heavy and hostile load on the agents. Running out of file descriptors, and many
//! thousands of concurrent proxied connections. Two nodes, one agent each. Needs root.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use mesh_tests::agent::{eventually, metric_sum, render_config, write_config, Agent, WorkloadSpec};
use mesh_tests::apps::{echo_server, soak_stop, soak_with, wait_soak_event};
use mesh_tests::bench::probe::cpu_secs;
use mesh_tests::{Proc, Topology};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(20);

struct Mesh {
    // Field order is drop order: agents and apps die before the topology is torn down.
    agents: Vec<Agent>,
    _server: Proc,
    _config: PathBuf,
    topo: Topology,
}

/// node1: client; node2: server (echo). Both enrolled.
fn setup() -> Result<Mesh> {
    setup_with(&[])
}

/// [`setup`] with extra `mesh-agent run` arguments for node1's agent.
fn setup_with(node1_args: &[&str]) -> Result<Mesh> {
    let topo = Topology::new(&[("node1", &["client"]), ("node2", &["server"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    write_config(
        &config,
        &render_config(
            &topo,
            &[WorkloadSpec::mesh("client"), WorkloadSpec::mesh("server")],
        ),
    )?;
    let server = echo_server(&topo, "server", PORT)?;
    let agents = vec![
        Agent::start_with(&topo, "node1", &config, node1_args)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    Ok(Mesh {
        agents,
        _server: server,
        _config: config,
        topo,
    })
}

fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The hard open-file limit of a process.
fn hard_open_file_limit(pid: u32) -> Result<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow::anyhow!("no open-file limit in /proc/{pid}/limits"))?;
    Ok(line.split_whitespace().nth(4).unwrap_or("").parse()?)
}

/// `prlimit --pid PID --nofile=N:HARD`: the soft open-file limit of a running process (the hard
/// one stays, so it can be raised again without privileges).
fn set_open_file_limit(pid: u32, n: usize) -> Result<()> {
    let hard = hard_open_file_limit(pid)?;
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={}:{hard}", n.min(hard)))
        .output()?;
    if !out.status.success() {
        bail!("prlimit: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn running_out_of_file_descriptors_is_logged_counted_and_survived() -> Result<()> {
    const CONNS: usize = 60;
    let mut m = setup()?;
    let pid = m.agents[0].proc.pid();
    // Room for about half the connections: the rest find the agent out of descriptors.
    set_open_file_limit(pid, open_files(pid)? + CONNS / 2)?;
    let server = format!("{}:{PORT}", m.topo.pod("server").ip4);
    let soak = soak_with(
        &m.topo,
        "client",
        &server,
        600_000,
        &[
            "--long-lived",
            &CONNS.to_string(),
            "--long-lived-only",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "60000",
        ],
    )?;
    let line = m.agents[0].wait_log("out of file descriptors", 0, T)?;
    assert!(line.contains("listener=outbound"), "{line}");
    // Backing off, not spinning: little CPU while the limit holds.
    let cpu = cpu_secs(pid)?;
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_secs(pid)? - cpu;
    assert!(spent < 0.5, "{spent} CPU s in 2 s while out of descriptors");
    let lines = m.agents[0].log();
    let said = lines
        .iter()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert!(said <= 2, "logged {said} times in a few seconds");
    assert!(m.agents[0].proc.try_wait()?.is_none(), "the agent is alive");

    // Descriptors again: every waiting connection is accepted and served, none failed.
    set_open_file_limit(pid, usize::MAX)?;
    let mut from = 0;
    for _ in 0..CONNS {
        from = wait_soak_event(&soak, "long_lived_open", from, T)?.0 + 1;
    }
    let r = soak_stop(soak)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["long_lived_connections"], CONNS, "{r}");
    assert!(eventually(T, || {
        m.agents[0].metrics(&m.topo).is_ok_and(|text| {
            metric_sum(
                &text,
                "mesh_accept_errors_total",
                &[("reason", "process_file_limit"), ("listener", "outbound")],
            ) > 0.0
        })
    }));
    let status = m.agents[0].stop(T)?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn ten_thousand_concurrent_connections_cross_node_each_byte_exact() -> Result<()> {
    const CONNS: usize = 10_000;
    let m = setup()?;
    let server = format!("{}:{PORT}", m.topo.pod("server").ip4);
    let rss = |m: &Mesh| -> Result<Vec<u64>> {
        m.agents
            .iter()
            .map(|a| mesh_tests::bench::probe::rss_bytes(a.proc.pid()))
            .collect()
    };
    let before = rss(&m)?;
    let mut hold = hold(&m.topo, &server, CONNS, 1024, 32, 60_000)?;
    let held = hold.wait_for_line(|l| l.contains("\"held\""), Duration::from_secs(300))?;
    let during = rss(&m)?;
    let open: Vec<usize> = m
        .agents
        .iter()
        .map(|a| open_files(a.proc.pid()))
        .collect::<Result<_>>()?;
    eprintln!(
        "{CONNS} connections held ({held}); agent RSS node1 {:.1} -> {:.1} MiB, node2 {:.1} -> \
         {:.1} MiB ({:.0} bytes per connection in all); open files {open:?}",
        before[0] as f64 / 1048576.0,
        during[0] as f64 / 1048576.0,
        before[1] as f64 / 1048576.0,
        during[1] as f64 / 1048576.0,
        (during[0] + during[1]).saturating_sub(before[0] + before[1]) as f64 / CONNS as f64,
    );
    assert!(
        open.iter().all(|n| *n > CONNS),
        "each agent holds a socket per connection: {open:?}"
    );
    // Every connection still works after the hold, byte for byte, and closes cleanly.
    hold.signal(libc::SIGINT)?;
    hold.wait_exit(Duration::from_secs(300))?;
    let last = hold.stdout_lines().last().cloned().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(&last)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["verified"], CONNS, "{r}");
    assert!(eventually(T, || {
        metric_sum(
            &m.agents[0].metrics(&m.topo).unwrap_or_default(),
            "istio_tcp_connections_closed_total",
            &[("reporter", "source")],
        ) == CONNS as f64
    }));
    // A generous bound, to catch a leak or a per-connection buffer gone wrong.
    for (node, bytes) in ["node1", "node2"].iter().zip(&during) {
        assert!(*bytes < 1 << 30, "{node} agent RSS {bytes} bytes");
    }
    Ok(())
}

/// `mesh-testapp hold` in the client pod: `conns` connections to `server`, opened by `workers`
/// threads, each checked with `bytes` both ways.
fn hold(
    topo: &Topology,
    server: &str,
    conns: usize,
    bytes: usize,
    workers: usize,
    timeout_ms: u64,
) -> Result<Proc> {
    let mut cmd = Command::new(mesh_tests::testapp_bin());
    cmd.args(["hold", "--connect", server])
        .args(["--conns", &conns.to_string()])
        .args(["--bytes", &bytes.to_string()])
        .args(["--workers", &workers.to_string()])
        .args(["--timeout-ms", &timeout_ms.to_string()]);
    topo.spawn_in_pod("client", cmd)
}

#[test]
fn a_pod_over_its_connection_cap_is_shed_counted_and_recovers() -> Result<()> {
    const CAP: usize = 8;
    let cap = CAP.to_string();
    let m = setup_with(&["--max-connections-per-pod", &cap])?;
    let (topo, agents) = (&m.topo, &m.agents);
    let server = format!("{}:{PORT}", topo.pod("server").ip4);
    // The client pod holds its whole share.
    let mut first = hold(topo, &server, CAP, 64, 1, 10_000)?;
    first.wait_for_line(|l| l.contains("\"held\""), T)?;
    // One more is reset at accept, counted and logged; the held ones are untouched.
    let mut extra = hold(topo, &server, 1, 64, 1, 10_000)?;
    extra.wait_exit(T)?;
    let last = extra.stdout_lines().last().cloned().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(&last)?;
    assert_eq!(r["ok"], false, "{r}");
    let line = agents[0].wait_log("connection shed", 0, T)?;
    assert!(line.contains("per_pod_connection_limit"), "{line}");
    assert!(eventually(T, || {
        metric_sum(
            &agents[0].metrics(topo).unwrap_or_default(),
            "mesh_connections_shed_total",
            &[
                ("reason", "per_pod_connection_limit"),
                ("listener", "outbound"),
            ],
        ) >= 1.0
    }));
    first.signal(libc::SIGINT)?;
    first.wait_exit(T)?;
    let last = first.stdout_lines().last().cloned().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(&last)?;
    assert_eq!(
        r["ok"], true,
        "the held connections were not disturbed: {r}"
    );
    // Their share released, the pod connects again.
    assert!(eventually(T, || {
        let Ok(mut again) = hold(topo, &server, CAP, 64, 1, 10_000) else {
            return false;
        };
        let held = again.wait_for_line(|l| l.contains("\"held\""), T).is_ok();
        let _ = again.signal(libc::SIGINT);
        let _ = again.wait_exit(T);
        held
    }));
    Ok(())
}
