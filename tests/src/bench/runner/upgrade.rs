//! The upgrade phase: new connections and long-lived streams through a hitless upgrade of each
//! agent in turn, then through a SIGKILL and restart of each.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{nap, Bench};
use crate::apps::{echo_server, soak_stop, soak_with, wait_soak_event};
use crate::bench::{bench_bin, UpgradeRun};
use crate::Proc;

/// Port of the echo server the long-lived streams use.
const ECHO_PORT: u16 = 7000;
const LONG_LIVED: usize = 20;
/// What the new agent logs once it holds the old one's sockets.
const TOOK_OVER: &str = "took the listening sockets over";

impl Bench<'_> {
    pub(super) fn upgrade(&mut self) -> Result<Option<UpgradeRun>> {
        let Some(sc) = self
            .scenarios
            .iter()
            .find(|s| s.name == "mesh-cross-node")
            .copied()
        else {
            self.progress
                .say("upgrade phase skipped: it runs on the mesh-cross-node scenario");
            return Ok(None);
        };
        let mut run = UpgradeRun {
            scenario: sc.name,
            ..UpgradeRun::default()
        };
        let _echo = echo_server(&self.topo, sc.server.name, ECHO_PORT)?;
        let settle = Duration::from_millis(if self.o.quick { 500 } else { 2000 });
        // Two upgrades, each with `settle` before and after.
        let window = 5 * settle + Duration::from_secs(4);

        self.progress.say(format!(
            "upgrade: {} new-connection workers and {LONG_LIVED} long-lived streams, upgrading \
             each agent in turn",
            self.o.crr_concurrency
        ));
        let crr = self.spawn_crr(&sc, window)?;
        let echo_addr = format!("{}:{ECHO_PORT}", self.topo.pod(sc.server.name).ip4);
        let soak = soak_with(
            &self.topo,
            sc.client.name,
            &echo_addr,
            600_000,
            &[
                "--long-lived",
                &LONG_LIVED.to_string(),
                "--long-lived-only",
                "--interval-ms",
                "10",
            ],
        )?;
        let mut from = 0;
        for _ in 0..LONG_LIVED {
            from = wait_soak_event(&soak, "long_lived_open", from, Duration::from_secs(30))?.0 + 1;
        }
        let mut old = Vec::new();
        for i in 0..self.agents.len() {
            nap(settle)?;
            let node = self.agents[i].node.clone();
            let before = self.count_in_log(&node, TOOK_OVER);
            let t = Instant::now();
            let new = self.start_agent(&node)?;
            self.wait_in_log(&node, TOOK_OVER, before)?;
            run.handover_ms.push(t.elapsed().as_secs_f64() * 1e3);
            old.push(std::mem::replace(&mut self.agents[i], new));
        }
        let crr = finish(crr, window)?;
        let soak = soak_stop(soak)?;
        // The old agents drain the streams they held, then exit on their own.
        for mut a in old {
            let st = a.proc.wait_exit(Duration::from_secs(30))?;
            if !st.success() {
                bail!("the replaced agent on {} exited with {st}", a.node);
            }
        }
        run.conns = crr["conns"].as_u64().unwrap_or(0);
        run.errors = crr["errors"].as_u64().unwrap_or(0);
        run.first_errors = strings(&crr["first_errors"]);
        run.p99_us = crr["p99_us"].as_f64().unwrap_or(0.0);
        run.max_us = crr["max_us"].as_f64().unwrap_or(0.0);
        run.long_lived = soak["long_lived_connections"].as_u64().unwrap_or(0);
        run.long_lived_roundtrips = soak["long_lived_roundtrips"].as_u64().unwrap_or(0);
        run.long_lived_errors = soak["long_lived_errors"].as_u64().unwrap_or(0);
        self.progress.say(format!(
            "upgrade: {} connections, {} failed, longest setup {:.1} ms; {} long-lived streams, \
             {} errors; handovers {:?} ms",
            run.conns,
            run.errors,
            run.max_us / 1e3,
            run.long_lived,
            run.long_lived_errors,
            run.handover_ms
        ));

        // The same new-connection load through a crash (SIGKILL) and restart of each agent.
        let crr = self.spawn_crr(&sc, window)?;
        for i in 0..self.agents.len() {
            nap(settle)?;
            let node = self.agents[i].node.clone();
            self.agents[i].proc.signal(libc::SIGKILL)?;
            self.agents[i].proc.wait_exit(Duration::from_secs(10))?;
            let t = Instant::now();
            self.agents[i] = self.start_agent(&node)?;
            run.restart_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let crr = finish(crr, window)?;
        run.kill_conns = crr["conns"].as_u64().unwrap_or(0);
        run.kill_errors = crr["errors"].as_u64().unwrap_or(0);
        run.kill_first_errors = strings(&crr["first_errors"]);
        run.kill_max_us = crr["max_us"].as_f64().unwrap_or(0.0);
        self.progress.say(format!(
            "SIGKILL: {} connections, {} failed ({:?}); restarts ready after {:?} ms",
            run.kill_conns, run.kill_errors, run.kill_first_errors, run.restart_ms
        ));
        Ok(Some(run))
    }

    /// `mesh-bench client --mode crr` for `window`, in the background.
    fn spawn_crr(&self, sc: &super::Scenario, window: Duration) -> Result<Proc> {
        let mut cmd = Command::new(bench_bin());
        cmd.args(["client", "--connect", &self.target(sc)]).args([
            "--mode",
            "crr",
            "--concurrency",
            &self.o.crr_concurrency.to_string(),
            "--warmup-ms",
            "0",
            "--duration-ms",
            &window.as_millis().to_string(),
        ]);
        self.topo.spawn_in_pod(sc.client.name, cmd)
    }

    fn count_in_log(&self, node: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.log_path(node))
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Waits until the node's agent log holds more than `before` lines with `needle`.
    fn wait_in_log(&self, node: &str, needle: &str, before: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count_in_log(node, needle) <= before {
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} in the {node} agent's log\n{}",
                    self.agent_log_tails()
                );
            }
            nap(Duration::from_millis(20))?;
        }
        Ok(())
    }
}

/// Waits for a background `mesh-bench client` and returns its result.
fn finish(mut p: Proc, window: Duration) -> Result<Value> {
    p.wait_exit(window + Duration::from_secs(60))?;
    let v: Value = p
        .stdout_lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("the client printed no result\n{}", p.diagnostics()))?;
    if v["ok"] != true {
        bail!("the client failed: {v}\n{}", p.diagnostics());
    }
    Ok(v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(String::from))
        .collect()
}
