//! The run: one topology, one agent per node, every scenario side by side, then the resource
//! phases (idle connections, enrolled pods), then teardown.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::http::HttpResults;
use super::probe::{self, interrupted, ProgStats};
use super::scenario::{PodSpec, Scenario, WAYPOINT_POD};
use super::stats::Stat;
use super::{bench_bin, IdleConns, Options, PodStep, Results, ScenarioResult, UpgradeRun};
use crate::agent::{agent_command, metric_sum, render_config, write_config, Agent, WorkloadSpec};
use crate::topology::http_get;
use crate::{Proc, Topology};

mod http;
mod upgrade;

/// Port of every `mesh-bench server`.
const PORT: u16 = 8080;
/// Pods per extra "pool" node for the enrolled-pods step (a node has 253 pod addresses).
const POOL_NODE_PODS: usize = 250;
const GIB: f64 = (1u64 << 30) as f64;

/// Sleeps, but gives up when the bench is interrupted.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(100)));
    }
    Ok(())
}

/// Progress on stderr, with the time since the start.
struct Progress(Instant);

impl Progress {
    fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

struct Bench<'a> {
    o: &'a Options,
    topo: Topology,
    scenarios: Vec<Scenario>,
    pods: Vec<PodSpec>,
    config: PathBuf,
    agents: Vec<Agent>,
    servers: Vec<Proc>,
    /// `mesh-agent waypoint` while the `http` measurement runs.
    waypoint: Option<Proc>,
    progress: Progress,
    phases: Vec<(String, f64)>,
}

pub(super) fn run(o: &Options, scenarios: Vec<Scenario>) -> Result<Results> {
    let started = Instant::now();
    let progress = Progress(started);
    let facts = probe::machine_facts();
    let bpf_guard = probe::BpfStats::enable()?;
    let mut pods = super::scenario::pods(&scenarios)?;
    if o.runs("http") {
        super::scenario::add_pods(&mut pods, super::http::pods())?;
    }

    progress.say(format!(
        "building the topology: node1, node2, pods {}",
        pods.iter()
            .map(|p| format!(
                "{}@{}{}",
                p.name,
                p.node,
                if p.mesh { " (mesh)" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let t = Instant::now();
    let pod_names = |node: &str| -> Vec<&str> {
        pods.iter()
            .filter(|p| p.node == node)
            .map(|p| p.name)
            .collect()
    };
    let (n1, n2) = (pod_names("node1"), pod_names("node2"));
    let topo = Topology::new(&[("node1", &n1), ("node2", &n2)])?;
    let prefix = topo.prefix().to_string();
    for p in &pods {
        // Connection-rate runs open tens of thousands of connections: let the client side reuse
        // TIME_WAIT ports and use a wide ephemeral range (per-pod sysctls, not the host's).
        crate::sys::netns_sysctls(
            &topo.pod(p.name).netns_path,
            &[
                ("net/ipv4/tcp_tw_reuse", "1"),
                ("net/ipv4/ip_local_port_range", "10000 65535"),
            ],
        )?;
    }
    let config = topo.work_dir().join("mesh.yaml");
    let mut bench = Bench {
        o,
        topo,
        scenarios,
        pods,
        config,
        agents: Vec::new(),
        servers: Vec::new(),
        waypoint: None,
        progress,
        phases: Vec::new(),
    };
    bench.phase("topology", t);

    let outcome = bench.measure();
    // Teardown whatever happened, then report.
    let t = Instant::now();
    // The waypoint first: its tunnels would hold the agents' drain.
    drop(bench.waypoint.take());
    let shutdown = bench.stop_agents();
    let Bench {
        topo,
        servers,
        mut phases,
        progress,
        ..
    } = bench;
    drop(servers);
    drop(topo);
    let leftovers = Topology::leftovers(&prefix);
    let restored = bpf_guard.restore();
    phases.push(("teardown".into(), t.elapsed().as_secs_f64()));
    let (
        scenario_results,
        rss_idle,
        pod_base_rss,
        pod_steps,
        agent_rss_after_traffic,
        upgrade,
        http,
    ) = outcome?;
    let shutdown_secs = shutdown?;
    progress.say(format!(
        "torn down; leftovers: {}",
        if leftovers.is_empty() {
            "none".to_string()
        } else {
            leftovers.join(", ")
        }
    ));
    Ok(Results {
        facts,
        options: o.to_json(),
        scenarios: scenario_results,
        rss_idle,
        agent_rss_after_traffic,
        pod_base_rss,
        pod_steps,
        upgrade,
        http,
        agent_shutdown_secs: shutdown_secs,
        leftovers,
        bpf_stats_previous: bpf_guard.previous(),
        loadavg_at_end: probe::loadavg(),
        bpf_stats_restored: restored,
        phases,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

type Measured = (
    Vec<ScenarioResult>,
    Stat,
    u64,
    Vec<PodStep>,
    Vec<u64>,
    Option<UpgradeRun>,
    Option<HttpResults>,
);

/// Per-scenario raw samples of the performance phase.
#[derive(Default)]
struct Raw {
    tput1: Vec<f64>,
    tput8: Vec<f64>,
    rr: Vec<Value>,
    crr: Vec<Value>,
    cpu_per_gib: Vec<f64>,
    cpu_per_10k_req: Vec<f64>,
    cpu_per_10k_conn: Vec<f64>,
    crr_errors: u64,
    crr_conns: u64,
    bpf: BTreeMap<String, ProgStats>,
}

impl Bench<'_> {
    fn phase(&mut self, name: &str, since: Instant) {
        self.phases
            .push((name.to_string(), since.elapsed().as_secs_f64()));
    }

    fn measure(&mut self) -> Result<Measured> {
        // Servers, config, agents.
        let t = Instant::now();
        let server_pods: Vec<&str> = {
            let mut v: Vec<&str> = self.scenarios.iter().map(|s| s.server.name).collect();
            v.sort();
            v.dedup();
            v
        };
        for pod in server_pods {
            let mut cmd = Command::new(bench_bin());
            cmd.args(["server", "--listen", &format!("0.0.0.0:{PORT}")]);
            if self.o.pin {
                cmd.args(["--cpu", "1"]);
            }
            let p = self.topo.spawn_in_pod(pod, cmd)?;
            p.wait_for_line(|l| l.contains("\"listening\""), Duration::from_secs(15))?;
            self.servers.push(p);
        }
        if self.o.runs("http") {
            self.start_http_servers()?;
        }
        write_config(&self.config, &self.render_config(&[]))?;
        self.start_agents()?;
        self.phase("servers and agents", t);
        nap(Duration::from_secs(1))?;
        let mut rss_idle = vec![self.rss(0)? as f64];
        self.progress.say(format!(
            "agents ready (pids {}); node1 agent idle RSS {:.1} MiB",
            self.agents
                .iter()
                .map(|a| a.proc.pid().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            rss_idle[0] / (1 << 20) as f64
        ));

        // Performance: every repetition runs every scenario, so drifts of a noisy machine hit all
        // of them alike.
        let t = Instant::now();
        let progs = probe::agent_programs(&[
            &self.topo.node("node1").pin_dir,
            &self.topo.node("node2").pin_dir,
        ])?;
        let mut raw: Vec<Raw> = self.scenarios.iter().map(|_| Raw::default()).collect();
        // The TCP measurements (their warm-ups too) only when one of them is asked for.
        let tcp = ["bulk", "rr", "crr"].iter().any(|m| self.o.runs(m));
        for rep in 0..if tcp { self.o.reps } else { 0 } {
            for (i, sc) in self.scenarios.clone().iter().enumerate() {
                self.perf_rep(sc, rep, &progs, &mut raw[i])?;
            }
        }
        self.phase("performance", t);
        let agent_rss_after_traffic = self.agent_rss()?;

        // HTTP direct, through the mesh and through the waypoint.
        let t = Instant::now();
        let http = if self.o.runs("http") {
            Some(self.http()?)
        } else {
            None
        };
        self.phase("http", t);

        // Upgrades and crashes under load.
        let t = Instant::now();
        let upgrade = if self.o.runs("upgrade") {
            self.upgrade()?
        } else {
            None
        };
        self.phase("upgrade", t);

        // Memory per idle proxied connection, on fresh agents.
        let t = Instant::now();
        let mut idle = Vec::new();
        for sc in self.scenarios.clone() {
            if !self.o.runs("idle") {
                idle.push(IdleConns::default());
                continue;
            }
            let mesh = sc.client.mesh || sc.server.mesh;
            if mesh {
                self.restart_agents()?;
                nap(Duration::from_millis(500))?;
                rss_idle.push(self.rss(0)? as f64);
            }
            idle.push(self.idle_conns(&sc)?);
        }
        self.phase("idle connections", t);

        // Memory per enrolled pod.
        let t = Instant::now();
        self.restart_agents()?;
        nap(Duration::from_secs(1))?;
        let base = self.rss(0)?;
        rss_idle.push(base as f64);
        let steps = if self.o.runs("pods") {
            self.pod_steps(base)?
        } else {
            Vec::new()
        };
        self.phase("enrolled pods", t);

        let results = self
            .scenarios
            .iter()
            .zip(raw)
            .zip(idle)
            .map(|((sc, raw), idle)| summarize(sc, raw, idle))
            .collect();
        Ok((
            results,
            Stat::of(&rss_idle).expect("at least one sample"),
            base,
            steps,
            agent_rss_after_traffic,
            upgrade,
            http,
        ))
    }

    fn target(&self, sc: &Scenario) -> String {
        format!("{}:{PORT}", self.topo.pod(sc.server.name).ip4)
    }

    fn perf_rep(
        &mut self,
        sc: &Scenario,
        rep: usize,
        progs: &BTreeMap<u64, String>,
        raw: &mut Raw,
    ) -> Result<()> {
        let o = self.o;
        let ms = |d: Duration| d.as_millis().to_string();
        // Warm-up: the path (HBONE pool connection, TLS session, caches, page cache of the
        // binaries) is established before anything is measured.
        let warm = o.warmup;
        self.client(
            sc,
            &[
                "--mode",
                "bulk",
                "--streams",
                "1",
                "--bytes",
                &(o.volume / 8).clamp(1 << 20, 256 << 20).to_string(),
            ],
        )?;
        self.client(sc, &["--mode", "rr", "--duration-ms", &ms(warm)])?;
        self.client(
            sc,
            &[
                "--mode",
                "crr",
                "--concurrency",
                &o.crr_concurrency.to_string(),
                "--duration-ms",
                &ms(warm),
            ],
        )?;

        let bpf0 = probe::prog_stats(progs)?;
        let volume = o.volume.to_string();
        let cpu0 = self.agent_cpu()?;
        let (b1, b8) = if o.runs("bulk") {
            (
                self.client(
                    sc,
                    &["--mode", "bulk", "--streams", "1", "--bytes", &volume],
                )?,
                self.client(
                    sc,
                    &["--mode", "bulk", "--streams", "8", "--bytes", &volume],
                )?,
            )
        } else {
            (Value::Null, Value::Null)
        };
        let cpu1 = self.agent_cpu()?;
        let rr = if o.runs("rr") {
            self.client(
                sc,
                &[
                    "--mode",
                    "rr",
                    "--size",
                    "1024",
                    "--duration-ms",
                    &ms(o.duration),
                ],
            )?
        } else {
            Value::Null
        };
        let cpu2 = self.agent_cpu()?;
        let crr = if o.runs("crr") {
            self.client(
                sc,
                &[
                    "--mode",
                    "crr",
                    "--concurrency",
                    &o.crr_concurrency.to_string(),
                    "--duration-ms",
                    &ms(o.duration),
                ],
            )?
        } else {
            Value::Null
        };
        let cpu3 = self.agent_cpu()?;
        let bpf1 = probe::prog_stats(progs)?;
        for (k, d) in probe::prog_delta(&bpf0, &bpf1) {
            let e = raw.bpf.entry(k).or_default();
            e.run_time_ns += d.run_time_ns;
            e.run_cnt += d.run_cnt;
        }

        let g1 = b1["gbps"].as_f64().unwrap_or(f64::NAN);
        let g8 = b8["gbps"].as_f64().unwrap_or(f64::NAN);
        raw.tput1.push(g1);
        raw.tput8.push(g8);
        raw.cpu_per_gib
            .push((cpu1 - cpu0) / (2.0 * o.volume as f64 / GIB));
        let reqs = rr["requests"].as_f64().unwrap_or(0.0);
        if reqs > 0.0 {
            raw.cpu_per_10k_req.push((cpu2 - cpu1) / (reqs / 1e4));
        }
        let conns = crr["conns"].as_f64().unwrap_or(0.0);
        if conns > 0.0 {
            raw.cpu_per_10k_conn.push((cpu3 - cpu2) / (conns / 1e4));
        }
        raw.crr_errors += crr["errors"].as_u64().unwrap_or(0);
        raw.crr_conns += conns as u64;
        if crr["errors"].as_u64().unwrap_or(0) > 0 {
            self.progress.say(format!(
                "  {}: {} connection errors, e.g. {}",
                sc.name, crr["errors"], crr["first_errors"]
            ));
        }
        let mut line = format!("rep {}/{} {:<18}", rep + 1, o.reps, sc.name);
        let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        if o.runs("bulk") {
            line += &format!(
                " | 1 stream {g1:>6.2} Gbit/s, 8 streams {g8:>6.2} Gbit/s, agent CPU {:.2} s/GiB",
                raw.cpu_per_gib.last().copied().unwrap_or(f64::NAN)
            );
        }
        if o.runs("rr") {
            line += &format!(
                " | rr p50 {:>6.1} µs p99 {:>7.1} µs {:>6.0} req/s",
                num(&rr, "p50_us"),
                num(&rr, "p99_us"),
                num(&rr, "rps")
            );
        }
        if o.runs("crr") {
            line += &format!(
                " | {:>6.0} conn/s p99 {:>7.1} µs",
                num(&crr, "cps"),
                num(&crr, "p99_us")
            );
        }
        self.progress.say(line);
        raw.rr.push(rr);
        raw.crr.push(crr);
        Ok(())
    }

    /// Runs `mesh-bench client` in the scenario's client pod and returns its JSON summary.
    fn client(&self, sc: &Scenario, args: &[&str]) -> Result<Value> {
        let target = self.target(sc);
        let mut cmd = Command::new(bench_bin());
        cmd.args(["client", "--connect", &target]).args(args);
        if self.o.pin {
            cmd.args(["--cpu", "0"]);
        }
        let timeout = Duration::from_secs(60)
            + 2 * self.o.duration
            + Duration::from_secs(self.o.volume / (20 << 20));
        let mut p = self.topo.spawn_in_pod(sc.client.name, cmd)?;
        let end = Instant::now() + timeout;
        loop {
            if p.wait_timeout(Duration::from_millis(100))?.is_some() {
                break;
            }
            if interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= end {
                let _ = p.kill_with_grace(Duration::from_millis(200));
                bail!(
                    "{}: client {args:?} did not finish within {timeout:?}\n{}",
                    sc.name,
                    p.diagnostics()
                );
            }
        }
        let lines = p.stdout_lines();
        let v: Value = lines
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| {
                format!("{}: client printed no result\n{}", sc.name, p.diagnostics())
            })?;
        if v["ok"] != true {
            bail!(
                "{}: client {args:?} failed: {}\n{}\n{}",
                sc.name,
                v["error"],
                p.diagnostics(),
                self.agent_log_tails()
            );
        }
        Ok(v)
    }

    // ---------------------------------------------------------------------------------------
    // agents

    /// The config: the bench pods (enrolled or not) plus `extra` enrolled pods assigned to node1
    /// wherever they live in the topology.
    fn render_config(&self, extra: &[String]) -> String {
        let specs: Vec<WorkloadSpec> = self
            .pods
            .iter()
            .map(|p| {
                if *p == WAYPOINT_POD {
                    // As Istio deploys a waypoint: its Gateway's name label and service account.
                    WorkloadSpec::mesh(p.name)
                        .label(
                            "gateway.networking.k8s.io/gateway-name",
                            super::http::WAYPOINT,
                        )
                        .service_account(super::http::WAYPOINT)
                } else if p.mesh {
                    WorkloadSpec::mesh(p.name)
                } else {
                    WorkloadSpec::plain(p.name)
                }
            })
            .collect();
        let mut text = render_config(&self.topo, &specs);
        for name in extra {
            let pod = self.topo.pod(name);
            text += &format!(
                "  - name: {n}\n    namespace: {ns}\n    serviceAccount: {n}\n    node: node1\n    ips: [{ip4}, \"{ip6}\"]\n    netns: {netns}\n    labels:\n      app: {n}\n",
                n = pod.name,
                ns = crate::agent::MESH_NS,
                ip4 = pod.ip4,
                ip6 = pod.ip6,
                netns = pod.netns_path.display()
            );
        }
        if self.o.runs("http") {
            text += &super::http::services_config();
        }
        text
    }

    fn start_agents(&mut self) -> Result<()> {
        for node in ["node1", "node2"] {
            let agent = self.start_agent(node)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// Starts `mesh-agent run` as the tests do, with its log going to a file in the work dir (the
    /// access log writes a line per connection; a file is what a node would have, and it keeps the
    /// bench's own process out of the measured path).
    fn start_agent(&self, node: &str) -> Result<Agent> {
        let inner = agent_command(&self.topo, node, &self.config);
        let log = self.log_path(node);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("exec \"$@\" 2>>\"$MESH_BENCH_AGENT_LOG\"")
            .arg("sh")
            .arg(inner.get_program())
            .args(inner.get_args())
            // Long enough for the upgrade phase's streams to finish on the agent they started on.
            .args(["--reload-interval-ms", "200", "--drain-timeout-secs", "30"])
            .env("RUST_LOG", "info")
            .env("MESH_BENCH_AGENT_LOG", &log);
        let proc = self.topo.spawn_in_node(node, cmd)?;
        let mut agent = Agent {
            node: node.into(),
            config: self.config.clone(),
            proc,
        };
        if let Err(e) = agent.wait_ready(&self.topo, Duration::from_secs(60)) {
            bail!("{e:#}\nagent log:\n{}", tail(&log, 30));
        }
        Ok(agent)
    }

    fn log_path(&self, node: &str) -> PathBuf {
        self.topo.work_dir().join(format!("agent-{node}.log"))
    }

    fn agent_log_tails(&self) -> String {
        ["node1", "node2"]
            .iter()
            .map(|n| format!("--- agent {n} log (tail):\n{}", tail(&self.log_path(n), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every agent (SIGTERM); returns the longest shutdown time.
    fn stop_agents(&mut self) -> Result<f64> {
        let mut longest = 0.0f64;
        let mut errors = Vec::new();
        for mut a in self.agents.drain(..) {
            let t = Instant::now();
            match a.stop(Duration::from_secs(60)) {
                Ok(st) if st.success() => {}
                Ok(st) => errors.push(format!("agent on {} exited with {st}", a.node)),
                Err(e) => errors.push(format!("agent on {}: {e:#}", a.node)),
            }
            longest = longest.max(t.elapsed().as_secs_f64());
        }
        if !errors.is_empty() {
            bail!("stopping the agents: {}", errors.join("; "));
        }
        Ok(longest)
    }

    fn restart_agents(&mut self) -> Result<()> {
        self.stop_agents()?;
        self.start_agents()
    }

    fn agent_cpu(&self) -> Result<f64> {
        self.agents
            .iter()
            .map(|a| probe::cpu_secs(a.proc.pid()))
            .sum()
    }

    fn rss(&self, agent: usize) -> Result<u64> {
        probe::rss_bytes(self.agents[agent].proc.pid())
    }

    fn agent_rss(&self) -> Result<Vec<u64>> {
        (0..self.agents.len()).map(|i| self.rss(i)).collect()
    }

    // ---------------------------------------------------------------------------------------
    // resources

    /// RSS of every agent before and while `idle_conns` connections are held open.
    fn idle_conns(&mut self, sc: &Scenario) -> Result<IdleConns> {
        let n = self.o.idle_conns;
        // Warm the path so one-time costs (pool connection, TLS) are not charged to the conns.
        self.client(sc, &["--mode", "rr", "--duration-ms", "200"])?;
        self.client(
            sc,
            &[
                "--mode",
                "crr",
                "--concurrency",
                "1",
                "--duration-ms",
                "200",
            ],
        )?;
        nap(Duration::from_millis(500))?;
        let before = self.agent_rss()?;
        let mut cmd = Command::new(bench_bin());
        cmd.args([
            "client",
            "--connect",
            &self.target(sc),
            "--mode",
            "hold",
            "--conns",
            &n.to_string(),
        ]);
        if self.o.pin {
            cmd.args(["--cpu", "0"]);
        }
        let mut p = self.topo.spawn_in_pod(sc.client.name, cmd)?;
        let held = p.wait_for_line(
            |l| l.contains("\"held\"") || l.contains("\"ok\":false"),
            Duration::from_secs(60) + Duration::from_millis(50 * n as u64),
        );
        let held = match held {
            Ok(l) if l.contains("\"held\"") => l,
            Ok(l) => bail!(
                "{}: hold client failed: {l}\n{}",
                sc.name,
                self.agent_log_tails()
            ),
            Err(e) => bail!("{}: {e:#}\n{}", sc.name, self.agent_log_tails()),
        };
        let open_secs = serde_json::from_str::<Value>(&held)?["secs"]
            .as_f64()
            .unwrap_or(f64::NAN);
        nap(Duration::from_secs(1))?;
        let during = self.agent_rss()?;
        let _ = p.kill_with_grace(Duration::from_millis(100));
        drop(p);
        nap(Duration::from_millis(500))?;
        let delta: i64 = during
            .iter()
            .zip(&before)
            .map(|(a, b)| *a as i64 - *b as i64)
            .sum();
        self.progress.say(format!(
            "{:<18} {n} idle connections: agents' RSS {:+.1} MiB ({:.0} bytes per connection), opened in {open_secs:.2} s",
            sc.name,
            delta as f64 / (1 << 20) as f64,
            delta as f64 / n as f64
        ));
        Ok(IdleConns {
            conns: n,
            rss_before: before,
            rss_during: during,
            bytes_per_conn: delta as f64 / n.max(1) as f64,
            open_secs,
        })
    }

    /// Adds cheap pods (a netns each, no process) enrolled on node1 up to each step, and records
    /// the node1 agent's RSS.
    fn pod_steps(&mut self, base: u64) -> Result<Vec<PodStep>> {
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        // A waypoint's pod is in the mesh but never captured: the agent does not enroll it.
        let node1_bench = self
            .pods
            .iter()
            .filter(|p| p.mesh && p.node == "node1" && **p != WAYPOINT_POD)
            .count();
        for &step in &self.o.pod_steps.clone() {
            let t = Instant::now();
            while names.len() < step {
                let i = names.len();
                let pool = format!("pool{}", i / POOL_NODE_PODS + 1);
                if i.is_multiple_of(POOL_NODE_PODS) {
                    self.topo.add_node(&pool)?;
                }
                let name = format!("s{i}");
                self.topo.add_pod(&pool, &name)?;
                names.push(name);
                if interrupted() {
                    bail!("interrupted");
                }
            }
            let create_secs = t.elapsed().as_secs_f64();
            let t = Instant::now();
            write_config(&self.config, &self.render_config(&names))?;
            let want = (node1_bench + step) as f64;
            let deadline =
                Instant::now() + Duration::from_secs(60) + Duration::from_millis(100 * step as u64);
            loop {
                let (_, body) = http_get(&self.topo, "node1", "127.0.0.1:15020", "/metrics")?;
                let have = metric_sum(&body, "mesh_workloads_enrolled", &[]);
                if have >= want {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "only {have} of {want} workloads enrolled after {:?}\n{}",
                        t.elapsed(),
                        self.agent_log_tails()
                    );
                }
                nap(Duration::from_millis(100))?;
            }
            let enroll_secs = t.elapsed().as_secs_f64();
            nap(Duration::from_secs(1))?;
            let rss = self.rss(0)?;
            let step_result = PodStep {
                pods: step,
                create_secs,
                enroll_secs,
                rss_bytes: rss,
                bytes_per_pod: (rss as f64 - base as f64) / step.max(1) as f64,
            };
            self.progress.say(format!(
                "{step} enrolled pods: node1 agent RSS {:.1} MiB ({:.0} bytes per pod); pods created in {create_secs:.1} s, enrolled in {enroll_secs:.1} s",
                rss as f64 / (1 << 20) as f64,
                step_result.bytes_per_pod
            ));
            out.push(step_result);
        }
        Ok(out)
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn summarize(sc: &Scenario, raw: Raw, idle: IdleConns) -> ScenarioResult {
    let mut metrics = BTreeMap::new();
    let mut put = |k: &'static str, v: &[f64]| {
        if let Some(s) = Stat::of(v) {
            metrics.insert(k, s);
        }
    };
    let field = |vals: &[Value], f: &str| -> Vec<f64> {
        vals.iter().filter_map(|v| v[f].as_f64()).collect()
    };
    put("tput_1_gbps", &raw.tput1);
    put("tput_8_gbps", &raw.tput8);
    put("rr_p50_us", &field(&raw.rr, "p50_us"));
    put("rr_p90_us", &field(&raw.rr, "p90_us"));
    put("rr_p99_us", &field(&raw.rr, "p99_us"));
    put("rr_p999_us", &field(&raw.rr, "p999_us"));
    put("rr_rps", &field(&raw.rr, "rps"));
    put("crr_cps", &field(&raw.crr, "cps"));
    put("crr_p50_us", &field(&raw.crr, "p50_us"));
    put("crr_p99_us", &field(&raw.crr, "p99_us"));
    put("cpu_s_per_gib", &raw.cpu_per_gib);
    put("cpu_s_per_10k_req", &raw.cpu_per_10k_req);
    put("cpu_s_per_10k_conn", &raw.cpu_per_10k_conn);
    if idle.conns > 0 {
        put("idle_conn_bytes", &[idle.bytes_per_conn]);
    }
    ScenarioResult {
        scenario: *sc,
        metrics,
        ebpf: raw.bpf,
        crr_errors: raw.crr_errors,
        crr_conns: raw.crr_conns,
        idle,
    }
}
