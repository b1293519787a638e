//! Driving `mesh-testapp` inside pods: echo servers, clients, soak runs.
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{testapp_bin, Proc, Topology};

/// Starts an echo server on `port` (IPv4 and IPv6) in `pod` and waits until it listens.
pub fn echo_server(topo: &Topology, pod: &str, port: u16) -> Result<Proc> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "echo-server",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--listen",
        &format!("[::]:{port}"),
    ]);
    let p = topo.spawn_in_pod(pod, cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), Duration::from_secs(15))?;
    Ok(p)
}

/// Runs `mesh-testapp client` in `pod`: `conns` connections each echoing `bytes`; returns the
/// summary (`ok`, `peer` = getpeername of the first connection, `local`, `errors`).
pub fn client(topo: &Topology, pod: &str, addr: &str, conns: usize, bytes: usize) -> Result<Value> {
    client_with(topo, pod, addr, conns, bytes, &[])
}

/// [`client`] with more `mesh-testapp client` options (`--marker TEXT`, `--timeout-ms T`).
pub fn client_with(
    topo: &Topology,
    pod: &str,
    addr: &str,
    conns: usize,
    bytes: usize,
    extra: &[&str],
) -> Result<Value> {
    let bin = testapp_bin();
    let (conns, bytes) = (conns.to_string(), bytes.to_string());
    let mut args = vec![
        bin.to_str().context("binary path")?,
        "client",
        "--connect",
        addr,
        "--conns",
        &conns,
        "--bytes",
        &bytes,
    ];
    args.extend_from_slice(extra);
    let out = topo.run_in_pod(pod, &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    match serde_json::from_str(line) {
        Ok(v) => Ok(v),
        Err(e) => bail!(
            "client output is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Waits (up to 10 s) until the echo server has reported `n` accepted connections after the first
/// `skip` lines of its output (its output reaches us through a pipe, a little after the fact),
/// and returns their peers.
pub fn wait_accepted(server: &Proc, skip: usize, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let peers = accepted_peers(server, skip);
        if peers.len() >= n || std::time::Instant::now() >= deadline {
            return peers;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peers the echo server accepted after the first `skip` lines of its output.
pub fn accepted_peers(server: &Proc, skip: usize) -> Vec<String> {
    server
        .stdout_lines()
        .iter()
        .skip(skip)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "accept")
        .map(|v| v["peer"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Starts `mesh-testapp soak` in `pod` against `addr` for `ms` milliseconds (a long-lived
/// connection plus a new connection every 20 ms).
pub fn soak(topo: &Topology, pod: &str, addr: &str, ms: u64) -> Result<Proc> {
    soak_with(topo, pod, addr, ms, &[])
}

/// [`soak`] with more `mesh-testapp soak` options (`--long-lived-only`, `--progress-every N`,
/// `--timeout-ms T`). The run prints an event line `long_lived_open` (with its `local` address)
/// after the first round trip of each long-lived connection, `long_lived_error` (`local`,
/// `roundtrips` on that connection, `error`, `unix_ms`) when one fails, `progress` every N
/// round trips, and `new_conn_error` (`error`, `unix_ms`) for each new connection that fails.
pub fn soak_with(topo: &Topology, pod: &str, addr: &str, ms: u64, extra: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(testapp_bin());
    cmd.args([
        "soak",
        "--connect",
        addr,
        "--duration-ms",
        &ms.to_string(),
        "--interval-ms",
        "20",
    ])
    .args(extra);
    topo.spawn_in_pod(pod, cmd)
}

/// Waits for a soak run to end and returns its summary.
pub fn soak_result(mut p: Proc) -> Result<Value> {
    p.wait_exit(Duration::from_secs(30))?;
    let lines = p.stdout_lines();
    let last = lines.last().context("soak printed no summary")?;
    Ok(serde_json::from_str(last)?)
}

/// Ends a soak run now (SIGINT: it stops cleanly, half-closing its long-lived connection and
/// waiting for the peer's close) and returns its summary.
pub fn soak_stop(mut p: Proc) -> Result<Value> {
    p.signal(libc::SIGINT)?;
    soak_result(p)
}

/// Waits for the first soak event line of `kind` at stdout line index `start` or later; returns
/// its index and the event.
pub fn wait_soak_event(
    p: &Proc,
    kind: &str,
    start: usize,
    timeout: Duration,
) -> Result<(usize, Value)> {
    let needle = format!("\"event\":\"{kind}\"");
    let (i, line) = p.wait_for_line_in(
        crate::process::Stdio2::Stdout,
        start,
        |l| l.contains(&needle),
        timeout,
    )?;
    Ok((i, serde_json::from_str(&line)?))
}

/// A packet capture (`tcpdump -w`) on an interface of one of the topology's namespaces.
pub struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    /// Starts capturing on `iface` in the network namespace named `netns` into `file`.
    pub fn start(netns: &str, iface: &str, file: &std::path::Path) -> Result<Capture> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns", "exec", netns, "tcpdump", "-i", iface, "-U", "-s", "0", "-B", "16384", "-n",
            "-w",
        ])
        .arg(file);
        let proc = Proc::spawn(cmd)?;
        proc.wait_for_stderr_line(|l| l.contains("listening on"), Duration::from_secs(10))?;
        Ok(Capture {
            proc,
            file: file.to_path_buf(),
        })
    }

    /// Stops the capture and returns the raw pcap bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        // Let the last packets reach the file before stopping.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(libc::SIGINT)?;
        self.proc.wait_exit(Duration::from_secs(10))?;
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }
}
