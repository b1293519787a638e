//! Running `mesh-agent` on topology nodes: config rendering, start/ready/stop, metrics scraping.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::topology::{http_get, Topology};
use crate::{agent_bin, Proc};

/// The namespace the tests enroll with `istio.io/dataplane-mode: ambient`.
pub const MESH_NS: &str = "default";
/// A namespace without the label: its workloads are not captured.
pub const PLAIN_NS: &str = "legacy";

/// How a pod appears in the config file.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub pod: String,
    pub namespace: String,
    /// Extra labels (e.g. `istio.io/dataplane-mode: none`).
    pub labels: Vec<(String, String)>,
    /// Its service account; `None`: the pod's name.
    pub service_account: Option<String>,
}

impl WorkloadSpec {
    /// A pod in the enrolled namespace.
    pub fn mesh(pod: &str) -> Self {
        Self {
            pod: pod.into(),
            namespace: MESH_NS.into(),
            labels: vec![],
            service_account: None,
        }
    }

    /// A pod in another enrolled namespace.
    pub fn in_namespace(pod: &str, namespace: &str) -> Self {
        Self {
            pod: pod.into(),
            namespace: namespace.into(),
            labels: vec![],
            service_account: None,
        }
    }

    /// A pod in the namespace without the label.
    pub fn plain(pod: &str) -> Self {
        Self {
            pod: pod.into(),
            namespace: PLAIN_NS.into(),
            labels: vec![],
            service_account: None,
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = Some(sa.into());
        self
    }
}

/// The file-mode config for `workloads` of `topo` (service account = pod name, `app` = pod name).
pub fn render_config(topo: &Topology, workloads: &[WorkloadSpec]) -> String {
    let mut out = String::new();
    writeln!(out, "namespaces:").unwrap();
    writeln!(
        out,
        "  - name: {MESH_NS}\n    labels: {{ istio.io/dataplane-mode: ambient }}"
    )
    .unwrap();
    writeln!(out, "  - name: {PLAIN_NS}").unwrap();
    // Any other namespace the workloads use is enrolled too.
    let mut others: Vec<&str> = workloads
        .iter()
        .map(|w| w.namespace.as_str())
        .filter(|ns| *ns != MESH_NS && *ns != PLAIN_NS)
        .collect();
    others.sort_unstable();
    others.dedup();
    for ns in others {
        writeln!(
            out,
            "  - name: {ns}\n    labels: {{ istio.io/dataplane-mode: ambient }}"
        )
        .unwrap();
    }
    writeln!(out, "workloads:").unwrap();
    for w in workloads {
        let pod = topo.pod(&w.pod);
        writeln!(out, "  - name: {}", pod.name).unwrap();
        writeln!(out, "    namespace: {}", w.namespace).unwrap();
        let sa = w.service_account.as_deref().unwrap_or(&pod.name);
        writeln!(out, "    serviceAccount: {sa}").unwrap();
        writeln!(out, "    node: {}", pod.node).unwrap();
        writeln!(out, "    ips: [{}, \"{}\"]", pod.ip4, pod.ip6).unwrap();
        writeln!(out, "    netns: {}", pod.netns_path.display()).unwrap();
        writeln!(out, "    labels:\n      app: {}", pod.name).unwrap();
        for (k, v) in &w.labels {
            writeln!(out, "      {k}: {v}").unwrap();
        }
    }
    out
}

/// Writes a config atomically (rename), as an operator's tooling would.
pub fn write_config(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A running agent on one node.
pub struct Agent {
    pub node: String,
    pub config: PathBuf,
    pub proc: Proc,
}

impl Agent {
    /// Starts the agent on `node` with its own cgroup root and pin dir, and waits until ready.
    pub fn start(topo: &Topology, node: &str, config: &Path) -> Result<Agent> {
        Self::start_with(topo, node, config, &[])
    }

    /// Like [`Agent::start`] with extra `mesh-agent run` arguments.
    pub fn start_with(topo: &Topology, node: &str, config: &Path, extra: &[&str]) -> Result<Agent> {
        let mut cmd = agent_command(topo, node, config);
        cmd.args(["--reload-interval-ms", "200"]);
        // A short drain keeps shutdowns quick, unless the test sets its own.
        if !extra.contains(&"--drain-timeout-secs") {
            cmd.args(["--drain-timeout-secs", "2"]);
        }
        cmd.args(extra).env("RUST_LOG", "info");
        let proc = topo.spawn_in_node(node, cmd)?;
        let mut agent = Agent {
            node: node.into(),
            config: config.into(),
            proc,
        };
        agent.wait_ready(topo, Duration::from_secs(30))?;
        // Readiness is set just before the first `configuration applied` line: wait for it too,
        // so a test's first `apply_config` measures from generation 1, not from nothing.
        agent.wait_applied(0, Duration::from_secs(30))?;
        Ok(agent)
    }

    /// Starts the agent on `node` in Kubernetes mode: everything it knows comes from the API
    /// server `kubeconfig` points at. Pod namespaces are found by IP among `netns_dir` only (the
    /// topology's pods; never the whole machine's `/proc`, where other tests' pods may hold the
    /// same addresses). Waits until ready (first full sync, every local pod wired).
    pub fn start_kubernetes(
        topo: &Topology,
        node: &str,
        kubeconfig: &Path,
        netns_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut agent = Self::spawn_kubernetes(topo, node, kubeconfig, netns_dir, extra)?;
        agent.wait_ready(topo, Duration::from_secs(30))?;
        Ok(agent)
    }

    /// [`Agent::start_kubernetes`] without waiting for readiness (start several at once). Call it
    /// from the thread that owns the agent: the child dies with the thread that spawned it.
    pub fn spawn_kubernetes(
        topo: &Topology,
        node: &str,
        kubeconfig: &Path,
        netns_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let n = topo.node(node);
        let no_procs = topo.work_dir().join("no-procs");
        std::fs::create_dir_all(&no_procs)?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--kubernetes", "--node", node])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--netns-dir")
            .arg(netns_dir)
            .arg("--proc-dir")
            .arg(&no_procs)
            .arg("--cgroup-root")
            .arg(&n.cgroup_root)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .arg("--state-dir")
            .arg(topo.work_dir().join(format!("state-{node}")))
            .args(["--drain-timeout-secs", "2"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("MESH_TEST_LOG").unwrap_or("info".into()),
            );
        let proc = topo.spawn_in_node(node, cmd)?;
        Ok(Agent {
            node: node.into(),
            config: kubeconfig.into(),
            proc,
        })
    }

    pub fn wait_ready(&mut self, topo: &Topology, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_get(topo, &self.node, "127.0.0.1:15021", "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            if let Ok(Some(status)) = self.proc.try_wait() {
                bail!(
                    "agent on {} exited with {status}:\n{}",
                    self.node,
                    self.proc.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "agent on {} not ready after {timeout:?} (last: {last}):\n{}",
            self.node,
            self.proc.diagnostics()
        )
    }

    /// The Prometheus text from `:15020/metrics`.
    pub fn metrics(&self, topo: &Topology) -> Result<String> {
        let (code, body) = http_get(topo, &self.node, "127.0.0.1:15020", "/metrics")?;
        if code != 200 {
            bail!("metrics answered {code}: {body}");
        }
        Ok(body)
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.signal(libc::SIGTERM)?;
        self.proc.wait_exit(timeout)
    }

    /// Log lines so far (the agent logs to stderr).
    pub fn log(&self) -> Vec<String> {
        self.proc.stderr_lines()
    }

    /// Waits for a log line containing `needle` that appears after the first `skip` lines.
    pub fn wait_log(&self, needle: &str, skip: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self
                .log()
                .into_iter()
                .skip(skip)
                .find(|l| l.contains(needle))
            {
                return Ok(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no log line with {needle:?} within {timeout:?}:\n{}",
            self.proc.diagnostics()
        )
    }

    /// The generation of the configuration in force: from the agent's last
    /// `configuration applied generation=N` line (0 before the first).
    pub fn generation(&self) -> u64 {
        self.log()
            .iter()
            .rev()
            .find_map(|l| applied_generation(l))
            .unwrap_or(0)
    }

    /// Waits until the agent has fully applied a configuration newer than generation `after`
    /// (state swapped, pods reconciled, live connections re-checked); returns its generation.
    pub fn wait_applied(&self, after: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.generation();
            if g > after {
                return Ok(g);
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} applied no configuration after generation {after} within \
                     {timeout:?}:\n{}",
                    self.node,
                    self.proc.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `N` of a `configuration applied generation=N` log line.
fn applied_generation(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("configuration applied generation=")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Writes `text` to the config file `path` (atomically) and waits until each of `agents` has
/// applied it: its generation moved past the one in force before the write.
pub fn apply_config(agents: &[&Agent], path: &Path, text: &str, timeout: Duration) -> Result<()> {
    let before: Vec<u64> = agents.iter().map(|a| a.generation()).collect();
    write_config(path, text)?;
    for (a, g) in agents.iter().zip(before) {
        a.wait_applied(g, timeout)?;
    }
    Ok(())
}

/// The wall-clock time at the start of an agent log line (tracing's RFC 3339 timestamp).
pub fn log_time(line: &str) -> Option<std::time::SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let t =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    Some(std::time::SystemTime::from(t))
}

/// `mesh-agent run` for `node` of `topo`: its node name, config, cgroup root and pin dir, and a
/// CA state dir shared by all agents of the topology (the first one creates the root).
pub fn agent_command(topo: &Topology, node: &str, config: &Path) -> Command {
    let n = topo.node(node);
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--node", node])
        .arg("--config")
        .arg(config)
        .arg("--cgroup-root")
        .arg(&n.cgroup_root)
        .arg("--pin-dir")
        .arg(&n.pin_dir)
        .arg("--state-dir")
        .arg(ca_dir(topo));
    cmd
}

/// A directory of symlinks to the topology's pod namespaces, for `--netns-dir`: the agent (or
/// `uninstall`) finds pods by IP among these only, never among other tests' pods, which may hold
/// the same addresses.
pub fn netns_dir(topo: &Topology) -> Result<PathBuf> {
    let dir = topo.work_dir().join("netns");
    std::fs::create_dir_all(&dir)?;
    for p in topo.pods() {
        let link = dir.join(&p.name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&p.netns_path, &link)?;
        }
    }
    Ok(dir)
}

/// `mesh-agent uninstall` on `node` (its pin dir; pods found among the topology's own); returns
/// its output, failing on a non-zero exit.
pub fn uninstall(topo: &Topology, node: &str) -> Result<String> {
    let (netns, no_procs) = (netns_dir(topo)?, topo.work_dir().join("no-procs"));
    std::fs::create_dir_all(&no_procs)?;
    let bin = agent_bin();
    let pin_dir = topo.node(node).pin_dir.display().to_string();
    let (netns, no_procs) = (netns.display().to_string(), no_procs.display().to_string());
    let out = topo.run_in_node(
        node,
        &[
            bin.to_str().context("agent path")?,
            "uninstall",
            "--pin-dir",
            &pin_dir,
            "--netns-dir",
            &netns,
            "--proc-dir",
            &no_procs,
        ],
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("mesh-agent uninstall on {node} failed: {text}");
    }
    Ok(text)
}

/// Where the topology's agents keep their shared mesh CA.
pub fn ca_dir(topo: &Topology) -> PathBuf {
    topo.work_dir().join("mesh-ca")
}

/// `bpftool cgroup tree` of the node's cgroup root: the programs attached there.
pub fn attached_programs(topo: &Topology, node: &str) -> Result<String> {
    let root = topo.node(node).cgroup_root.display().to_string();
    let out = topo.run_in_node(node, &["bpftool", "cgroup", "tree", &root])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `bpftool map dump pinned` of one of the node agent's maps.
pub fn bpftool_dump(topo: &Topology, node: &str, map: &str) -> Result<String> {
    let pin = topo.node(node).pin_dir.join(map).display().to_string();
    let out = topo.run_in_node(node, &["bpftool", "map", "dump", "pinned", &pin])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mesh-agent inspect maps ARGS` against the node agent's pin dir; fails on a non-zero exit.
pub fn inspect_maps(topo: &Topology, node: &str, args: &[&str]) -> Result<String> {
    let (bin, pin_dir) = (agent_bin(), topo.node(node).pin_dir.display().to_string());
    let mut all = vec![
        bin.to_str().context("agent path")?,
        "inspect",
        "maps",
        "--pin-dir",
        &pin_dir,
    ];
    all.extend_from_slice(args);
    let out = topo.run_in_node(node, &all)?;
    if !out.status.success() {
        bail!(
            "inspect maps failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sum of the samples of `name` whose labels contain every `key="value"` of `filters`.
pub fn metric_sum(text: &str, name: &str, filters: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            filters
                .iter()
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Every series of metric `name` in the Prometheus text `text`: its labels and its value.
pub fn metric_series(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            Some((
                parse_labels(labels.strip_suffix('}')?)?,
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// `a="x",b="y\"z"` into a map (values unescaped).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.insert(name.to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the mesh left on `node` and inside `pods` (empty once it is uninstalled): the pin
/// directory, programs on the node's cgroup root, links in the pods' namespaces, and in each pod
/// the source-preserving rule, a proxy listener, or a mesh sysctl still set.
pub fn leftovers(topo: &Topology, node: &str, pods: &[&str]) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let pin_dir = &topo.node(node).pin_dir;
    if pin_dir.exists() {
        left.push(format!("pin dir {}", pin_dir.display()));
    }
    let tree = attached_programs(topo, node)?;
    if tree.contains("mesh_") {
        left.push(format!("programs attached:\n{tree}"));
    }
    let links = topo.run_in_node(node, &["bpftool", "-j", "link", "show"])?;
    let links: serde_json::Value =
        serde_json::from_slice(&links.stdout).unwrap_or(serde_json::Value::Null);
    for pod in pods {
        let run = |args: &[&str]| -> Result<String> {
            let out = topo.run_in_pod(pod, args)?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let ino =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&topo.pod(pod).netns_path)?);
        if links
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["netns_ino"] == ino)
        {
            left.push(format!("a link in {pod}'s namespace: {links}"));
        }
        let rules = run(&["ip", "rule", "show"])?;
        if rules.contains("lookup 133") {
            left.push(format!("source-preserving rule in {pod}:\n{rules}"));
        }
        let listeners = run(&["ss", "-Htln"])?;
        if [":15001", ":15006", ":15008"]
            .iter()
            .any(|p| listeners.contains(p))
        {
            left.push(format!("a proxy listener in {pod}:\n{listeners}"));
        }
        for sysctl in [
            "net.ipv4.tcp_fwmark_accept",
            "net.ipv4.fwmark_reflect",
            "net.ipv6.fwmark_reflect",
        ] {
            if run(&["sysctl", "-n", sysctl])? != "0" {
                left.push(format!("{sysctl} set in {pod}"));
            }
        }
    }
    Ok(left)
}

/// A `mesh-agent waypoint` process in its own pod.
pub struct Waypoint {
    pub pod: String,
    pub proc: Proc,
}

impl Waypoint {
    /// Starts the waypoint `name` (a Gateway in the config, in the mesh namespace) in `pod`,
    /// with the topology's CA, and waits until it serves.
    pub fn start(topo: &Topology, pod: &str, name: &str, config: &Path) -> Result<Waypoint> {
        Self::start_with(topo, pod, name, config, &[])
    }

    /// As [`start`](Self::start), with `extra` arguments (e.g. `--access-log json`).
    pub fn start_with(
        topo: &Topology,
        pod: &str,
        name: &str,
        config: &Path,
        extra: &[&str],
    ) -> Result<Waypoint> {
        Self::start_in(topo, pod, MESH_NS, name, config, extra)
    }

    /// As [`start_with`](Self::start_with), for a Gateway and pod in `namespace`.
    pub fn start_in(
        topo: &Topology,
        pod: &str,
        namespace: &str,
        name: &str,
        config: &Path,
        extra: &[&str],
    ) -> Result<Waypoint> {
        let mut cmd = Command::new(agent_bin());
        cmd.args([
            "waypoint",
            "--name",
            name,
            "--namespace",
            namespace,
            "--pod",
            pod,
        ])
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(ca_dir(topo))
        .args(["--reload-interval-ms", "200", "--drain-timeout-secs", "1"])
        .args(extra)
        .env("RUST_LOG", "info");
        let proc = topo.spawn_in_pod(pod, cmd)?;
        proc.wait_for_stderr_line(|l| l.contains("waypoint ready"), Duration::from_secs(30))
            .with_context(|| format!("waypoint {name} in pod {pod}"))?;
        Ok(Waypoint {
            pod: pod.into(),
            proc,
        })
    }

    /// The Prometheus text from its `:15020/metrics`.
    pub fn metrics(&self, topo: &Topology) -> Result<String> {
        let (code, body) = crate::topology::http_get_in(
            &topo.pod(&self.pod).netns_path,
            "127.0.0.1:15020",
            "/metrics",
            Duration::from_secs(10),
        )?;
        if code != 200 {
            bail!("waypoint metrics answered {code}: {body}");
        }
        Ok(body)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.proc
            .wait_for_stderr_line(|l| l.contains(needle), timeout)
            .with_context(|| format!("waypoint log line with {needle:?}"))
    }

    /// The access-log lines written so far (its standard output, one line per request).
    pub fn access_log(&self) -> Vec<String> {
        self.proc.stdout_lines()
    }

    /// Waits for an access-log line containing `needle`.
    pub fn wait_access_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.proc
            .wait_for_line(|l| l.contains(needle), timeout)
            .with_context(|| format!("waypoint access-log line with {needle:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_lines_and_their_times_are_read() {
        let line = "2026-12-06T01:02:03.250000Z  INFO configuration applied generation=12";
        assert_eq!(applied_generation(line), Some(12));
        assert_eq!(
            applied_generation("2026-12-06T01:02:03Z  INFO config file changed"),
            None
        );
        let t = log_time(line).expect("timestamp");
        let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms % 1000, 250);
        assert_eq!(log_time("no timestamp here"), None);
    }

    #[test]
    fn metric_series_have_their_labels_unescaped() {
        let text = "# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"z\",c=\"\"} 3\nx_total 4\ny_total{a=\"1\"} 5\n";
        let series = metric_series(text, "x_total");
        let labels: BTreeMap<String, String> = [("a", "1"), ("b", "q\"z"), ("c", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(series, vec![(labels, 3.0), (BTreeMap::new(), 4.0)]);
    }

    #[test]
    fn metric_sum_filters_by_labels() {
        let text = "# HELP x\nistio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\"} 2\n\
                    istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"b\"} 3\n\
                    istio_tcp_connections_closed_total{reporter=\"source\",source_workload=\"a\"} 1\n";
        assert_eq!(
            metric_sum(text, "istio_tcp_connections_opened_total", &[]),
            5.0
        );
        assert_eq!(
            metric_sum(
                text,
                "istio_tcp_connections_opened_total",
                &[("source_workload", "a")]
            ),
            2.0
        );
        assert_eq!(
            metric_sum(
                text,
                "istio_tcp_connections_opened_total",
                &[("source_workload", "c")]
            ),
            0.0
        );
    }
}
