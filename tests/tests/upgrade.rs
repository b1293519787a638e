//! End to end: a new agent takes over from the running one on the same node (a hitless
//! upgrade) while traffic flows, on a two-node network-namespace topology. Needs root.
//!
//! Topology: node1 holds `c1` and `s1`, node2 holds `c2` and `s2` (all enrolled; `s1`, `s2` run
//! echo servers). Each client soaks both servers, so traffic is same-node and cross-node.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mesh_tests::agent::{
    eventually, leftovers, metric_sum, render_config, uninstall, write_config, Agent, WorkloadSpec,
};
use mesh_tests::apps::{client_with, echo_server, soak_stop, soak_with, wait_soak_event, Capture};
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const PORT: u16 = 7000;
/// Every server also listens here, and a DENY policy covers it: no connection may ever get
/// through, before, during or after an upgrade or a crash.
const DENIED_PORT: u16 = 7001;

/// A `policies:` section with one namespace-wide DENY of `port`.
fn deny_port(port: u16) -> String {
    format!(
        "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{ name: deny-{port}, namespace: default }}
    spec:
      action: DENY
      rules:
        - to: [{{ operation: {{ ports: [\"{port}\"] }} }}]
"
    )
}
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
    write_config(
        &config,
        &format!(
            "{}{}",
            render_config(&topo, &workloads),
            deny_port(DENIED_PORT)
        ),
    )?;
    let mut servers = Vec::new();
    for server in ["s1", "s2"] {
        for port in [PORT, DENIED_PORT] {
            servers.push(echo_server(&topo, server, port)?);
        }
    }
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

/// node1: `c1`, node2: `s2` (echo server), both enrolled; node1's agent runs with `node1_args`
/// (node2's with [`AGENT_ARGS`]). Returns the mesh and its config text.
fn pair(node1_args: &[&str]) -> Result<(Mesh, String)> {
    let topo = Topology::new(&[("node1", &["c1"]), ("node2", &["s2"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    let base = render_config(&topo, &[WorkloadSpec::mesh("c1"), WorkloadSpec::mesh("s2")]);
    write_config(&config, &base)?;
    let servers = vec![echo_server(&topo, "s2", PORT)?];
    let agents = vec![
        Agent::start_with(&topo, "node1", &config, node1_args)?,
        Agent::start_with(&topo, "node2", &config, AGENT_ARGS)?,
    ];
    let mesh = Mesh {
        agents,
        _servers: servers,
        config,
        topo,
    };
    Ok((mesh, base))
}

/// Soaks from every client to every server: `LONG_LIVED` long-lived connections each, plus
/// `workers` threads opening new connections back to back.
fn start_load(topo: &Topology, workers: usize, extra: &[&str]) -> Result<Vec<Proc>> {
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
                ]
                .into_iter()
                .chain(extra.iter().copied())
                .collect::<Vec<_>>(),
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

/// Starts a new agent on the node of `agents[index]` next to the running one and waits until it
/// took over (ready, its configuration applied) and the old one said it drains. Returns the old
/// agent and how long the new one took to start and take over.
fn upgrade(
    topo: &Topology,
    config: &Path,
    agents: &mut [Agent],
    index: usize,
) -> Result<(Agent, Duration)> {
    let node = agents[index].node.clone();
    let started = Instant::now();
    let new = Agent::start_with(topo, &node, config, AGENT_ARGS)?;
    let took = started.elapsed();
    let line = new.wait_log("took the listening sockets over", 0, T)?;
    assert!(
        line.contains(&format!("predecessor={}", agents[index].proc.pid())),
        "{line}"
    );
    agents[index].wait_log("handed over to the new agent", 0, T)?;
    let old = std::mem::replace(&mut agents[index], new);
    Ok((old, took))
}

fn summary(runs: Vec<Proc>) -> Result<Vec<Value>> {
    runs.into_iter().map(soak_stop).collect()
}

/// Runs `during` while another thread keeps trying the denied flow (c1 to s2 on the denied
/// port); returns what `during` returned and how many attempts were made. Panics if one got
/// through.
fn while_denied_flow_is_tried<T>(topo: &Topology, during: impl FnOnce() -> T) -> (T, usize) {
    let (stop, attempts) = (AtomicBool::new(false), AtomicUsize::new(0));
    let addr = format!("{}:{DENIED_PORT}", topo.pod("s2").ip4);
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = client_with(topo, "c1", &addr, 1, 1024, &["--timeout-ms", "3000"])
                    .expect("client runs");
                assert_eq!(r["ok"], false, "the denied flow got through: {r}");
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        });
        let out = during();
        stop.store(true, Ordering::Relaxed);
        prober.join().expect("the denied flow stayed denied");
        (out, attempts.load(Ordering::Relaxed))
    })
}

#[test]
fn upgrading_each_agent_under_load_fails_no_connection() -> Result<()> {
    let mut m = setup()?;
    let runs = start_load(&m.topo, 2, &[])?;
    let started = Instant::now();
    let (topo, config, agents) = (&m.topo, &m.config, &mut m.agents);
    let (upgraded, denied_attempts) = while_denied_flow_is_tried(topo, || -> Result<_> {
        std::thread::sleep(Duration::from_millis(500));
        let (old1, took1) = upgrade(topo, config, agents, 0)?;
        std::thread::sleep(Duration::from_millis(500));
        let (old2, took2) = upgrade(topo, config, agents, 1)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok((old1, took1, old2, took2))
    });
    let (mut old1, took1, mut old2, took2) = upgraded?;
    assert!(denied_attempts > 0);

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
        eventually(T, || opened(&m.agents[0]) > before + 10.0),
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
        assert_eq!(
            count("istio_tcp_connections_opened_total"),
            made,
            "{client}"
        );
        assert_eq!(
            count("istio_tcp_connections_closed_total"),
            made,
            "{client}"
        );
    }
    Ok(())
}

/// Milliseconds since the epoch, as the soak's events stamp them.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// How a new connection failed.
#[derive(Debug, PartialEq)]
enum Failure {
    /// Refused or reset at connect (no agent behind the pod's redirect, or one that died with
    /// the connection in its backlog), or closed or reset before a
    /// single byte came back (the local proxy accepted but could not reach the destination's
    /// node, whose agent was down). Nothing was delivered.
    Clean,
    /// Cut in the middle of the exchange: it was in flight through the agent that was killed.
    InFlight,
    Other,
}

fn classify(error: &str) -> Failure {
    if (error.starts_with("connect ") && (error.contains("refused") || error.contains("reset")))
        || error.starts_with("write at 0:")
        || error.starts_with("read after 0 bytes:")
        || error.starts_with("EOF after 0 of")
    {
        Failure::Clean
    } else if error.starts_with("write at ")
        || error.starts_with("read after ")
        || error.starts_with("EOF after ")
    {
        Failure::InFlight
    } else {
        Failure::Other
    }
}

#[test]
fn sigkill_under_load_fails_closed_leaks_no_plaintext_and_recovers() -> Result<()> {
    let mut m = setup()?;
    let marker = "MESH-PLAINTEXT-MARKER-9c41";
    let pcap = m.topo.work_dir().join("fabric.pcap");
    let capture = Capture::start(m.topo.fabric_netns(), "any", &pcap)?;
    let runs = start_load(&m.topo, 2, &["--marker", marker])?;

    let (topo, config, agents) = (&m.topo, &m.config, &mut m.agents);
    let (outages, denied_attempts) = while_denied_flow_is_tried(topo, || -> Result<_> {
        let mut outages = Vec::new();
        for agent in agents.iter_mut() {
            std::thread::sleep(Duration::from_millis(500));
            let killed_at = unix_ms();
            agent.proc.signal(libc::SIGKILL)?;
            agent.proc.wait_exit(T)?;
            let node = agent.node.clone();
            let started = Instant::now();
            *agent = Agent::start_with(topo, &node, config, AGENT_ARGS)?;
            outages.push((node, killed_at, unix_ms(), started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(outages)
    });
    let outages = outages?;
    assert!(denied_attempts > 0);

    let results: Vec<(Vec<Value>, Value)> = runs
        .into_iter()
        .map(|p| {
            let events: Vec<Value> = p
                .stdout_lines()
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            Ok((events, soak_stop(p)?))
        })
        .collect::<Result<_>>()?;
    let bytes = capture.finish()?;
    assert!(
        bytes.len() > 1 << 20,
        "the capture saw the traffic ({} bytes)",
        bytes.len()
    );
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext of mesh traffic crossed the fabric"
    );

    // Every failed new connection failed cleanly, during an outage; each outage ended within a
    // bound once the new agent was up.
    let mut last_failure = vec![0u64; outages.len()];
    let (mut failures, mut in_flight) = (0, 0);
    for (events, summary) in &results {
        assert!(
            summary["new_conns_ok"].as_u64().unwrap_or_default() > 0,
            "{summary}"
        );
        for e in events.iter().filter(|e| e["event"] == "new_conn_error") {
            let (error, at) = (
                e["error"].as_str().unwrap_or_default(),
                e["unix_ms"].as_u64().unwrap_or_default(),
            );
            let outage = outages
                .iter()
                .rposition(|(_, killed_at, _, _)| at >= *killed_at)
                .unwrap_or_else(|| panic!("a failure before any kill: {e}"));
            match classify(error) {
                Failure::Clean => {}
                // Only what the killed agent was relaying at that moment.
                Failure::InFlight => {
                    assert!(
                        at < outages[outage].1 + 1_000,
                        "cut long after the kill: {e}"
                    );
                    in_flight += 1;
                }
                Failure::Other => panic!("not a clean failure: {e}"),
            }
            last_failure[outage] = last_failure[outage].max(at);
            failures += 1;
        }
        // The long-lived connections broken by a kill came back: each run opened more.
        let opened = events
            .iter()
            .filter(|e| e["event"] == "long_lived_open")
            .count();
        assert!(
            opened >= 2 * LONG_LIVED,
            "{opened} long-lived opens: {summary}"
        );
    }
    for ((node, killed_at, up_at, restart), last) in outages.iter().zip(&last_failure) {
        let back = last.saturating_sub(*killed_at);
        eprintln!(
            "SIGKILL on {node}: new agent ready {restart:?} after start, last failed connection \
             {back} ms after the kill ({:+} ms from the new agent's readiness)",
            *last as i64 - *up_at as i64
        );
        assert!(
            *last <= up_at + 2_000,
            "{node}: connections still failed {} ms after the new agent was ready",
            last - up_at
        );
    }
    eprintln!(
        "{failures} failed new connections in all ({in_flight} cut in flight by a kill, the rest \
         refused or closed before any byte), no plaintext seen"
    );

    // `mesh-agent uninstall` after a crash leaves nothing behind.
    let agent = &mut m.agents[0];
    agent.proc.signal(libc::SIGKILL)?;
    agent.proc.wait_exit(T)?;
    uninstall(&m.topo, "node1")?;
    let left = leftovers(&m.topo, "node1", &["c1", "s1"])?;
    assert!(left.is_empty(), "uninstall after a crash left: {left:#?}");
    Ok(())
}

#[test]
fn the_drain_deadline_cuts_what_is_left_and_names_each_connection() -> Result<()> {
    // The old agent may drain for one second only; a long-lived connection outlasts it.
    let (mut m, _) = pair(&["--drain-timeout-secs", "1"])?;
    let (topo, config, agents) = (&m.topo, &m.config, &mut m.agents);
    let addr = format!("{}:{PORT}", topo.pod("s2").ip4);
    let held = soak_with(topo, "c1", &addr, 600_000, &["--long-lived-only"])?;
    let (_, open) = wait_soak_event(&held, "long_lived_open", 0, T)?;
    // The app's side of a captured connection is a loopback socket: the line names its port.
    let local = open["local"].as_str().unwrap_or_default().to_string();
    let port = local.rsplit(':').next().unwrap_or_default().to_string();

    let (mut old, _) = upgrade(topo, config, agents, 0)?;
    let line = old.wait_log("drain deadline passed; closing connection", 0, T)?;
    assert!(
        line.contains("pod=default/c1") && line.contains(&format!(":{port} ")),
        "names the pod and the connection's port ({local}): {line}"
    );
    assert!(line.contains("listener=outbound"), "{line}");
    let status = old.proc.wait_exit(T)?;
    assert!(status.success(), "{status}");
    // Cut: the client saw its connection end, then reconnected through the new agent.
    let (i, _) = wait_soak_event(&held, "long_lived_error", 0, T)?;
    wait_soak_event(&held, "long_lived_open", i + 1, T)?;
    soak_stop(held)?;
    // The cut connection is counted closed too (in the counters the new agent carried over).
    agents[0].wait_log("its last counts carried over", 0, T)?;
    let count = |name: &str| {
        let text = agents[0].metrics(topo).unwrap_or_default();
        metric_sum(
            &text,
            name,
            &[("reporter", "source"), ("source_workload", "c1")],
        )
    };
    assert!(
        eventually(T, || count("istio_tcp_connections_closed_total") == 2.0),
        "closed {} of {} opened",
        count("istio_tcp_connections_closed_total"),
        count("istio_tcp_connections_opened_total")
    );
    assert_eq!(count("istio_tcp_connections_opened_total"), 2.0);
    Ok(())
}

#[test]
fn a_policy_edit_still_closes_a_denied_connection_on_a_draining_agent() -> Result<()> {
    // The destination's agent enforces policy. It is upgraded while a connection is open, so
    // that connection stays on the old, draining agent; a policy edit must still reach it.
    let (mut m, base) = pair(AGENT_ARGS)?;
    let (topo, config, agents) = (&m.topo, &m.config, &mut m.agents);
    let addr = format!("{}:{PORT}", topo.pod("s2").ip4);
    let held = soak_with(
        topo,
        "c1",
        &addr,
        600_000,
        &["--long-lived-only", "--progress-every", "10"],
    )?;
    wait_soak_event(&held, "long_lived_open", 0, T)?;
    let (old, _) = upgrade(topo, config, agents, 1)?;
    // Still alive on the old agent.
    let seen = held.stdout_lines().len();
    wait_soak_event(&held, "progress", seen, T)?;

    let current: Vec<&Agent> = agents.iter().collect();
    let denied = format!("{base}{}", deny_port(PORT));
    mesh_tests::agent::apply_config(&current, config, &denied, T)?;
    let line = old.wait_log("closing a live connection: the new policy denies it", 0, T)?;
    assert!(line.contains(":7000"), "{line}");
    wait_soak_event(&held, "long_lived_error", 0, T)?;
    let _ = soak_stop(held);
    Ok(())
}
