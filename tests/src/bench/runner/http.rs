//! The `http` measurement's run: `mesh-testapp http-server` in the server pods, `mesh-agent
//! waypoint` in its own pod, and per repetition, every row in turn: a warm-up, a latency run
//! (1 connection) and a throughput run (`--http-conns` connections) with the agents' and the
//! waypoint's CPU time read around it.
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{nap, tail, Bench};
use crate::agent::{ca_dir, MESH_NS};
use crate::bench::http::{
    server_pods, HttpResults, HttpRow, Interleaved, RepSample, BODY_BYTES, HTTP_PORT, HTTP_ROWS,
    MESH, MESH_WAYPOINT, MESH_WAYPOINT_POLICY, SERVICE_PORT, WAYPOINT,
};
use crate::bench::probe::{self, interrupted};
use crate::bench::scenario::WAYPOINT_POD;
use crate::{agent_bin, testapp_bin};

/// What the waypoint logs once it serves.
const READY: &str = "waypoint ready";

/// Makes the command's process (and every thread it starts) run on `cpu` only.
fn pin(cmd: &mut Command, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < CPU_SETSIZE (the
    // bench pins to CPUs 0 and 1). sched_setaffinity is async-signal-safe and `set` is moved
    // into the closure.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Bench<'_> {
    /// One `http-server` per server pod (one runtime thread, on CPU 1 when pinning).
    pub(super) fn start_http_servers(&mut self) -> Result<()> {
        for pod in server_pods() {
            let mut cmd = Command::new(testapp_bin());
            cmd.args(["http-server", "--name", pod.name, "--workers", "1"])
                .args(["--listen", &format!("0.0.0.0:{HTTP_PORT}")]);
            if self.o.pin {
                pin(&mut cmd, 1);
            }
            let p = self.topo.spawn_in_pod(pod.name, cmd)?;
            p.wait_for_line(|l| l.contains("\"listening\""), Duration::from_secs(15))
                .with_context(|| format!("http-server in pod {}", pod.name))?;
            self.servers.push(p);
        }
        Ok(())
    }

    fn waypoint_log(&self) -> PathBuf {
        self.topo.work_dir().join("waypoint.log")
    }

    /// Starts `mesh-agent waypoint` in its pod, its log going to a file in the work dir (like
    /// the agents': it writes a line per request), and waits until it serves.
    fn start_waypoint(&mut self) -> Result<()> {
        let log = self.waypoint_log();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("exec \"$@\" 2>>\"$MESH_BENCH_WAYPOINT_LOG\"")
            .arg("sh")
            .arg(agent_bin())
            .args(["waypoint", "--name", WAYPOINT, "--namespace", MESH_NS])
            .args(["--pod", WAYPOINT_POD.name, "--config"])
            .arg(&self.config)
            .arg("--state-dir")
            .arg(ca_dir(&self.topo))
            .args(["--reload-interval-ms", "200", "--drain-timeout-secs", "1"])
            .env("RUST_LOG", "info")
            .env("MESH_BENCH_WAYPOINT_LOG", &log);
        let mut p = self.topo.spawn_in_pod(WAYPOINT_POD.name, cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(READY)
        {
            if let Some(st) = p.try_wait()? {
                bail!("the waypoint exited with {st}:\n{}", tail(&log, 20));
            }
            if Instant::now() >= deadline {
                bail!(
                    "the waypoint did not log {READY:?} within 30 s:\n{}",
                    tail(&log, 20)
                );
            }
            nap(Duration::from_millis(50))?;
        }
        self.waypoint = Some(p);
        Ok(())
    }

    fn waypoint_pid(&self) -> Result<u32> {
        self.waypoint
            .as_ref()
            .map(|p| p.pid())
            .context("the waypoint is not running")
    }

    /// Every row side by side in each repetition (the order rotated per repetition), then the
    /// waypoint's memory; the waypoint is stopped at the end.
    pub(super) fn http(&mut self) -> Result<HttpResults> {
        self.start_waypoint()?;
        self.progress.say(format!(
            "http: waypoint ready in pod {} on {} (pid {}); {} repetitions of {}",
            WAYPOINT_POD.name,
            WAYPOINT_POD.node,
            self.waypoint_pid()?,
            self.o.reps,
            HTTP_ROWS
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut samples: Vec<Vec<RepSample>> = HTTP_ROWS.iter().map(|_| Vec::new()).collect();
        let (mut waypoint_pairs, mut policy_pairs) = (Vec::new(), Vec::new());
        for rep in 0..self.o.reps {
            for k in 0..HTTP_ROWS.len() {
                let i = (k + rep) % HTTP_ROWS.len();
                let s = self.http_rep(&HTTP_ROWS[i], rep)?;
                samples[i].push(s);
            }
            waypoint_pairs.push(self.interleaved(rep, MESH, MESH_WAYPOINT)?);
            policy_pairs.push(self.interleaved(rep, MESH_WAYPOINT, MESH_WAYPOINT_POLICY)?);
        }
        let pid = self.waypoint_pid()?;
        let (rss, peak) = probe::rss_and_peak_bytes(pid)?;
        if let Some(mut p) = self.waypoint.take() {
            let _ = p.kill_with_grace(Duration::from_secs(2));
        }
        let rows = HTTP_ROWS.iter().copied().zip(samples).collect();
        let h = HttpResults::new(
            self.o.http_conns,
            rows,
            waypoint_pairs,
            policy_pairs,
            rss,
            peak,
        );
        self.progress.say(format!(
            "http: waypoint RSS {:.1} MiB, peak {:.1} MiB; added p50 {}",
            rss as f64 / (1 << 20) as f64,
            peak as f64 / (1 << 20) as f64,
            h.added_p50_us
                .as_ref()
                .map_or("—".into(), |a| format!("{:.1} µs", a.median))
        ));
        Ok(h)
    }

    /// The interleaved run of rows `base` and `other` ([`Interleaved`]), as long as a row's
    /// latency run.
    fn interleaved(&mut self, rep: usize, base: &str, other: &str) -> Result<Interleaved> {
        let row = |name: &str| -> Result<&'static HttpRow> {
            HTTP_ROWS
                .iter()
                .find(|r| r.name == name)
                .with_context(|| format!("no {name} row"))
        };
        let (a, b) = (row(base)?, row(other)?);
        let v = self.http_client(a, 1, self.o.duration, Some(b))?;
        let pair = Interleaved {
            base_p50_us: num(&v, &["latency_us", "p50"]),
            other_p50_us: num(&v, &["paired", "latency_us", "p50"]),
            requests: v["responses"].as_u64().unwrap_or(0),
        };
        self.progress.say(format!(
            "rep {}/{} http {other} vs {base}, interleaved | p50 {:.1} vs {:.1} µs ({:+.1}) over {} requests each",
            rep + 1,
            self.o.reps,
            pair.other_p50_us,
            pair.base_p50_us,
            pair.other_p50_us - pair.base_p50_us,
            pair.requests
        ));
        Ok(pair)
    }

    fn http_rep(&mut self, row: &HttpRow, rep: usize) -> Result<RepSample> {
        let o = self.o;
        let waypoint_cpu = |b: &Self| -> Result<f64> { probe::cpu_secs(b.waypoint_pid()?) };
        // Warm-up: connections, HBONE pool, TLS sessions, the waypoint's upstreams.
        self.http_client(
            row,
            o.http_conns,
            o.warmup.max(Duration::from_millis(100)),
            None,
        )?;
        let lat = self.http_client(row, 1, o.duration, None)?;
        let (a0, w0) = (self.agent_cpu()?, waypoint_cpu(self)?);
        let tput = self.http_client(row, o.http_conns, o.duration, None)?;
        let (a1, w1) = (self.agent_cpu()?, waypoint_cpu(self)?);
        let s = RepSample {
            p50_us: num(&lat, &["latency_us", "p50"]),
            p90_us: num(&lat, &["latency_us", "p90"]),
            p99_us: num(&lat, &["latency_us", "p99"]),
            latency_rps: num(&lat, &["rps"]),
            rps: num(&tput, &["rps"]),
            requests: tput["responses"].as_u64().unwrap_or(0),
            agents_cpu_s: a1 - a0,
            waypoint_cpu_s: row.waypoint.then_some(w1 - w0),
        };
        let mut line = format!(
            "rep {}/{} http {:<14} | p50 {:>6.1} µs p90 {:>6.1} µs p99 {:>7.1} µs {:>6.0} req/s | {} conns {:>7.0} req/s, agents {:.4} CPU s/1k req",
            rep + 1,
            o.reps,
            row.name,
            s.p50_us,
            s.p90_us,
            s.p99_us,
            s.latency_rps,
            o.http_conns,
            s.rps,
            crate::bench::http::cpu_per_1k(s.agents_cpu_s, s.requests).unwrap_or(f64::NAN)
        );
        if let Some(w) = s.waypoint_cpu_s {
            line += &format!(
                ", waypoint {:.4} CPU s/1k req",
                crate::bench::http::cpu_per_1k(w, s.requests).unwrap_or(f64::NAN)
            );
        }
        self.progress.say(line);
        Ok(s)
    }

    /// The URL of a row: the Service's virtual IP, else the server pod's address.
    fn http_url(&self, row: &HttpRow) -> String {
        match row.service {
            Some((_, vip)) => format!("http://{vip}:{SERVICE_PORT}/bench"),
            None => format!(
                "http://{}:{HTTP_PORT}/bench",
                self.topo.pod(row.server.name).ip4
            ),
        }
    }

    /// `mesh-testapp http-client` in the row's client pod for `duration` over `conns` keep-alive
    /// connections (one runtime thread, on CPU 0 when pinning), alternating with `paired`'s
    /// Service when given (same client pod); its JSON summary, checked: every request answered
    /// 200 by the row's server with a body of `BODY_BYTES`.
    fn http_client(
        &self,
        row: &HttpRow,
        conns: usize,
        duration: Duration,
        paired: Option<&HttpRow>,
    ) -> Result<Value> {
        let mut cmd = Command::new(testapp_bin());
        cmd.args([
            "http-client",
            "--workers",
            "1",
            "--url",
            &self.http_url(row),
        ])
        .args(["--method", "POST", "--body-bytes", &BODY_BYTES.to_string()])
        .args(["--header", &format!("x-response-bytes: {BODY_BYTES}")])
        .args(["--concurrency", &conns.to_string()])
        .args(["--duration-ms", &duration.as_millis().to_string()]);
        if let Some(p) = paired {
            cmd.args(["--paired-url", &self.http_url(p)]);
        }
        if self.o.pin {
            pin(&mut cmd, 0);
        }
        let mut p = self.topo.spawn_in_pod(row.client.name, cmd)?;
        let timeout = Duration::from_secs(60) + 2 * duration;
        let end = Instant::now() + timeout;
        while p.wait_timeout(Duration::from_millis(100))?.is_none() {
            if interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= end {
                let _ = p.kill_with_grace(Duration::from_millis(200));
                bail!(
                    "http {}: the client did not finish within {timeout:?}\n{}",
                    row.name,
                    p.diagnostics()
                );
            }
        }
        let v: Value = p
            .stdout_lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| {
                format!(
                    "http {}: the client printed no result\n{}",
                    row.name,
                    p.diagnostics()
                )
            })?;
        let mut sides = vec![(row, &v)];
        if let Some(p) = paired {
            sides.push((p, &v["paired"]));
        }
        let problem = if v["ok"] != true {
            Some(format!(
                "failed requests: {} {}",
                v["errors"], v["paired"]["errors"]
            ))
        } else {
            sides.iter().find_map(|(row, v)| answer_problem(row, v))
        };
        if let Some(problem) = problem {
            bail!(
                "http {}: {problem}\n{}\n--- waypoint log (tail):\n{}",
                row.name,
                self.agent_log_tails(),
                tail(&self.waypoint_log(), 15)
            );
        }
        Ok(v)
    }
}

/// The number at `path` in a client's summary (NaN when absent).
fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// What is wrong with one side of a client's summary, if anything: every request must have been
/// answered 200 by the row's server with a body of `BODY_BYTES`.
fn answer_problem(row: &HttpRow, v: &Value) -> Option<String> {
    let responses = v["responses"].as_u64().unwrap_or(0);
    if responses == 0 {
        Some(format!("{}: no responses", row.name))
    } else if v["status"]["200"].as_u64() != Some(responses) {
        Some(format!(
            "{}: answers other than 200: {}",
            row.name, v["status"]
        ))
    } else if v["served_by"][row.server.name].as_u64() != Some(responses) {
        Some(format!(
            "{}: answered by {} (expected {})",
            row.name, v["served_by"], row.server.name
        ))
    } else if v["first"]["body_bytes"].as_u64() != Some(BODY_BYTES as u64) {
        Some(format!(
            "{}: a {}-byte response body (expected {BODY_BYTES}): {}",
            row.name, v["first"]["body_bytes"], v["first"]["body"]
        ))
    } else {
        None
    }
}
