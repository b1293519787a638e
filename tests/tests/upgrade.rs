//! End to end: a new agent takes over from the running one on the same node (a hitless
//! upgrade) while traffic flows, on a two-node network-namespace topology. Needs root.
//!
//! Topology: node1 holds `c1` and `s1`, node2 holds `c2` and `s2` (all enrolled; `s1`, `s2` run
//! echo servers). Each client soaks both servers, so traffic is same-node and cross-node.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_tests::agent::{metric_sum, render_config, write_config, Agent, WorkloadSpec};
use mesh_tests::apps::{echo_server, soak_stop, soak_with, wait_soak_event};
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(20);
/// Long-lived connections per soak run (four runs: 20 in all).
const LONG_LIVED: usize = 5;

struct Mesh {
    // Field order is drop order: agents and apps die before the topology is torn down.
    agents: Vec<Agent>,
    _servers: Vec<Proc>,
    config: PathBuf,
    topo: Topology,
}

/// Both agents drain for up to a minute: the long-lived connections they hold at the handover
/// must finish on them, not be cut.
const AGENT_ARGS: &[&str] = &["--drain-timeout-secs", "60"];

fn setup() -> Result<Mesh> {
    let topo = Topology::new(&[("node1", &["c1", "s1"]), ("node2", &["c2", "s2"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    let workloads: Vec<WorkloadSpec> = ["c1", "s1", "c2", "s2"]
        .into_iter()
        .map(WorkloadSpec::mesh)
        .collect();
    write_config(&config, &render_config(&topo, &workloads))?;
    let servers = vec![
        echo_server(&topo, "s1", PORT)?,
        echo_server(&topo, "s2", PORT)?,
    ];
    let agents = vec![
        Agent::start_with(&topo, "node1", &config, AGENT_ARGS)?,
        Agent::start_with(&topo, "node2", &config, AGENT_ARGS)?,
    ];
    Ok(Mesh {
        agents,
        _servers: servers,
        config,
        topo,
    })
}

/// Soaks from every client to every server: `LONG_LIVED` long-lived connections each, plus
/// `workers` threads opening new connections back to back.
fn start_load(topo: &Topology, workers: usize) -> Result<Vec<Proc>> {
    let mut runs = Vec::new();
    for client in ["c1", "c2"] {
        for server in ["s1", "s2"] {
            let addr = format!("{}:{PORT}", topo.pod(server).ip4);
            let p = soak_with(
                topo,
                client,
                &addr,
                600_000,
                &[
                    "--long-lived",
                    &LONG_LIVED.to_string(),
                    "--workers",
                    &workers.to_string(),
                    "--interval-ms",
                    "1",
                    "--timeout-ms",
                    "10000",
                ],
            )?;
            runs.push(p);
        }
    }
    for p in &runs {
        let mut from = 0;
        for _ in 0..LONG_LIVED {
            let (i, _) = wait_soak_event(p, "long_lived_open", from, T)?;
            from = i + 1;
        }
    }
    Ok(runs)
}

/// Starts a new agent on `node` next to the running one and waits until it took over (ready,
/// its configuration applied) and the old one said it drains.
fn upgrade(m: &mut Mesh, index: usize) -> Result<(Agent, Duration)> {
    let node = m.agents[index].node.clone();
    let started = Instant::now();
    let new = Agent::start_with(&m.topo, &node, &m.config, AGENT_ARGS)?;
    let took = started.elapsed();
    let line = new.wait_log("took the listening sockets over", 0, T)?;
    assert!(
        line.contains(&format!("predecessor={}", m.agents[index].proc.pid())),
        "{line}"
    );
    m.agents[index].wait_log("handed over to the new agent", 0, T)?;
    let old = std::mem::replace(&mut m.agents[index], new);
    Ok((old, took))
}

fn summary(runs: Vec<Proc>) -> Result<Vec<Value>> {
    runs.into_iter().map(soak_stop).collect()
}

#[test]
fn upgrading_each_agent_under_load_fails_no_connection() -> Result<()> {
    let mut m = setup()?;
    let runs = start_load(&m.topo, 2)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    let (mut old1, took1) = upgrade(&mut m, 0)?;
    std::thread::sleep(Duration::from_millis(500));
    let (mut old2, took2) = upgrade(&mut m, 1)?;
    std::thread::sleep(Duration::from_millis(500));

    // The new agents serve new connections: the old ones only drain what they held.
    let opened = |agent: &Agent| {
        let text = agent.metrics(&m.topo).unwrap();
        metric_sum(
            &text,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")],
        )
    };
    let before = opened(&m.agents[0]);
    assert!(
        mesh_tests::agent::eventually(T, || opened(&m.agents[0]) > before + 10.0),
        "the new agent on node1 opens no connections"
    );

    let elapsed = started.elapsed().as_secs_f64();
    let results = summary(runs)?;
    let mut new_conns = 0.0;
    for r in &results {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["new_conns_failed"], 0, "{r}");
        assert_eq!(r["long_lived_errors"], 0, "{r}");
        // Every long-lived connection is the one opened before the upgrades, byte-exact to its
        // clean end (the soak checks each echo and the final close).
        assert_eq!(r["long_lived_connections"], LONG_LIVED, "{r}");
        new_conns += r["new_conns_ok"].as_f64().unwrap_or_default();
    }
    eprintln!(
        "upgrade under load: {new_conns} new connections in {elapsed:.1} s ({:.0}/s), \
         {} long-lived, handovers took {took1:?} and {took2:?}, no failure",
        new_conns / elapsed,
        4 * LONG_LIVED
    );

    // The old agents drained what they held (the long-lived connections, ended by the soak's
    // stop) and exited on their own, cutting nothing.
    for (old, new) in [(&mut old1, &m.agents[0]), (&mut old2, &m.agents[1])] {
        new.wait_log("its last counts carried over", 0, T)?;
        let status = old.proc.wait_exit(T)?;
        assert!(status.success(), "{status}\n{}", old.proc.diagnostics());
        let log = old.log();
        assert!(
            !log.iter().any(|l| l.contains("drain deadline passed")),
            "{log:#?}"
        );
        assert!(
            log.iter()
                .any(|l| l.contains("stopped after handing over to the new agent")),
            "{log:#?}"
        );
    }

    // The new agents' counters continue the old ones': every connection each client made is
    // counted once, whichever agent served it, and every one of them is counted closed.
    for (i, client) in ["c1", "c2"].into_iter().enumerate() {
        let made: f64 = results[2 * i..2 * i + 2]
            .iter()
            .map(|r| {
                r["new_conns_ok"].as_f64().unwrap_or_default()
                    + r["long_lived_connections"].as_f64().unwrap_or_default()
            })
            .sum();
        let text = m.agents[i].metrics(&m.topo)?;
        let count = |name: &str| {
            metric_sum(
                &text,
                name,
                &[("reporter", "source"), ("source_workload", client)],
            )
        };
        assert_eq!(count("istio_tcp_connections_opened_total"), made, "{client}");
        assert_eq!(count("istio_tcp_connections_closed_total"), made, "{client}");
    }
    Ok(())
}
