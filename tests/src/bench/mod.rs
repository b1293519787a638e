//! `cargo xtask bench`: what the mesh costs, measured side by side with the no-mesh baseline in
//! one run on one topology.
//!
//! * [`scenario`]: the table of scenarios (who talks to whom, enrolled or not).
//! * [`http`]: the HTTP rows (`direct`, `mesh`, `mesh-waypoint`), their figures and targets.
//! * [`runner`]: topology, agents, `mesh-bench` servers and clients, the phases.
//! * [`probe`]: machine facts, CPU time and RSS from `/proc`, BPF run-time statistics, Ctrl-C.
//! * [`report`]: `bench.json`, the Markdown tables, `bench.svg`.
//! * [`compare`]: two runs' `bench.json`, figure by figure (`--compare OLD NEW`).
//!
//! The load generator is `mesh-bench` (`src/bin/mesh-bench.rs`; `mesh-testapp http-client` for
//! the HTTP rows), the driver `mesh-bench-run`.
//! Needs root, like the end-to-end tests.
pub mod compare;
pub mod http;
pub mod probe;
pub mod report;
mod runner;
pub mod scenario;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

pub use scenario::{Scenario, BASELINE, SCENARIOS};
pub use stats::Stat;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    /// Scenario names (`all` for every one); empty: the defaults.
    pub scenarios: Vec<String>,
    /// Length of each request/response and connection-rate run.
    pub duration: Duration,
    /// Bytes moved by each throughput run (1 stream, and 8 streams together).
    pub volume: u64,
    /// Repetitions of every performance measurement.
    pub reps: usize,
    /// Warm-up before each repetition of a scenario (request/response and connection rate).
    pub warmup: Duration,
    /// Concurrent connectors of the connection-rate run.
    pub crr_concurrency: usize,
    /// Keep-alive connections of the HTTP throughput run.
    pub http_conns: usize,
    /// Idle connections held for the memory-per-connection figure.
    pub idle_conns: usize,
    /// Enrolled-pod counts at which the agent's RSS is recorded.
    pub pod_steps: Vec<usize>,
    /// Pin the client to CPU 0 and the server to CPU 1.
    pub pin: bool,
    /// Which measurements to run (see [`MEASUREMENTS`]); empty: all of them.
    pub only: Vec<String>,
    /// Free text recorded with the results (what was special about this run).
    pub note: String,
    pub out: PathBuf,
}

/// The measurements `--only` can pick: throughput (1 and 8 streams), request/response, connection
/// rate, HTTP request/response direct, through the mesh and through the waypoint, memory per idle
/// connection, memory per enrolled pod, connections through upgrades and crashes of the agents.
pub const MEASUREMENTS: &[&str] = &["bulk", "rr", "crr", "http", "idle", "pods", "upgrade"];

impl Options {
    /// The full run (what BENCHMARKS.md records).
    pub fn full(out: PathBuf) -> Options {
        Options {
            quick: false,
            scenarios: Vec::new(),
            duration: Duration::from_secs(10),
            volume: 1 << 30,
            reps: 3,
            warmup: Duration::from_secs(1),
            crr_concurrency: 4,
            http_conns: 8,
            idle_conns: 1000,
            pod_steps: vec![100, 1000],
            pin: true,
            only: Vec::new(),
            note: String::new(),
            out,
        }
    }

    /// Whether measurement `m` (one of [`MEASUREMENTS`]) runs.
    pub fn runs(&self, m: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == m)
    }

    /// The smoke run CI uses: every phase, small sizes, well under 2 minutes.
    pub fn quick(out: PathBuf) -> Options {
        Options {
            quick: true,
            duration: Duration::from_secs(1),
            volume: 64 << 20,
            reps: 2,
            warmup: Duration::from_millis(300),
            idle_conns: 100,
            pod_steps: vec![10, 50],
            ..Options::full(out)
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "scenarios": self.scenarios,
            "duration_secs": self.duration.as_secs_f64(),
            "volume_bytes": self.volume,
            "reps": self.reps,
            "warmup_secs": self.warmup.as_secs_f64(),
            "crr_concurrency": self.crr_concurrency,
            "http_conns": self.http_conns,
            "idle_conns": self.idle_conns,
            "pod_steps": self.pod_steps,
            "pin": self.pin,
            "only": self.only,
            "note": self.note,
            "agent_bin": crate::agent_bin().display().to_string(),
            "pinning": if self.pin {
                "load clients (mesh-bench, mesh-testapp http-client) on CPU 0, servers on CPU 1 (sched_setaffinity); agents, waypoint and kernel unpinned"
            } else {
                "nothing pinned"
            },
            "rss_units": "bytes (VmRSS)",
        })
    }
}

/// Memory held for idle proxied connections.
#[derive(Debug, Clone, Default)]
pub struct IdleConns {
    pub conns: usize,
    /// RSS of each agent (node1, node2) before and while the connections are open.
    pub rss_before: Vec<u64>,
    pub rss_during: Vec<u64>,
    /// Sum over the agents of the RSS growth, per connection.
    pub bytes_per_conn: f64,
    /// Time to open and confirm all of them.
    pub open_secs: f64,
}

/// New connections and long-lived streams through a hitless upgrade of each agent in turn, then
/// new connections through a SIGKILL and restart of each.
#[derive(Debug, Clone, Default)]
pub struct UpgradeRun {
    pub scenario: &'static str,
    /// Connections opened (and confirmed end to end) while both agents were upgraded.
    pub conns: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub p99_us: f64,
    /// The longest connection setup: the longest stall a new connection saw.
    pub max_us: f64,
    pub long_lived: u64,
    pub long_lived_roundtrips: u64,
    pub long_lived_errors: u64,
    /// Start of each new agent until it held the old one's sockets.
    pub handover_ms: Vec<f64>,
    pub kill_conns: u64,
    pub kill_errors: u64,
    pub kill_first_errors: Vec<String>,
    pub kill_max_us: f64,
    /// Start of each restarted agent until it was ready.
    pub restart_ms: Vec<f64>,
}

/// The node1 agent's RSS at a number of enrolled pods.
#[derive(Debug, Clone)]
pub struct PodStep {
    pub pods: usize,
    pub create_secs: f64,
    pub enroll_secs: f64,
    pub rss_bytes: u64,
    pub bytes_per_pod: f64,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// Metric key (see [`report::METRICS`]) -> median and spread.
    pub metrics: BTreeMap<&'static str, Stat>,
    /// BPF program name -> run time and runs during the performance phase (both nodes).
    pub ebpf: BTreeMap<String, probe::ProgStats>,
    pub crr_errors: u64,
    pub crr_conns: u64,
    pub idle: IdleConns,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub facts: Value,
    pub options: Value,
    pub scenarios: Vec<ScenarioResult>,
    /// node1 agent's RSS right after a (re)start with the bench pods enrolled, before traffic.
    pub rss_idle: Stat,
    /// Each agent's RSS after the performance phase.
    pub agent_rss_after_traffic: Vec<u64>,
    /// node1 agent's RSS before the enrolled-pods step.
    pub pod_base_rss: u64,
    pub pod_steps: Vec<PodStep>,
    pub upgrade: Option<UpgradeRun>,
    /// The `http` measurement (`None` when not run).
    pub http: Option<http::HttpResults>,
    /// Longest SIGTERM-to-exit of the agents at the end (with every pod enrolled).
    pub agent_shutdown_secs: f64,
    /// What the teardown left behind (must be empty).
    pub leftovers: Vec<String>,
    pub bpf_stats_previous: i32,
    pub bpf_stats_restored: Option<String>,
    /// `/proc/loadavg` when the run ended (the start is in `facts`).
    pub loadavg_at_end: String,
    /// Wall time per phase.
    pub phases: Vec<(String, f64)>,
    pub wall_secs: f64,
}

/// Runs the bench and writes `bench.json`, `bench.md` and `bench.svg` into `o.out`.
pub fn run(o: &Options) -> Result<Results> {
    if let Some(m) = o.only.iter().find(|m| !MEASUREMENTS.contains(&m.as_str())) {
        anyhow::bail!(
            "unknown measurement {m:?}; known: {}",
            MEASUREMENTS.join(", ")
        );
    }
    let scenarios = scenario::select(&o.scenarios)?;
    std::fs::create_dir_all(&o.out)?;
    probe::install_interrupt_handler();
    let results = runner::run(o, scenarios)?;
    report::write_all(&results, &o.out)?;
    Ok(results)
}

/// Path of the `mesh-bench` load generator: `$MESH_BENCH_BIN`, else next to this executable.
pub fn bench_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_BENCH_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.with_file_name("mesh-bench")
}
