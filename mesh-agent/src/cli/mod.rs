//! Command line: `run` (the node agent) and `inspect` (read pinned state).
pub mod explain;
pub mod inspect;
pub mod run;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless service mesh node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: capture enrolled pods' traffic and proxy it.
    Run(Box<RunArgs>),
    /// Inspect the agent's state without talking to it.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Evaluate the config's policies for a connection, without sending traffic.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The mesh config file (file mode); watched for changes.
    #[arg(long)]
    pub config: PathBuf,
    /// This node's name; only workloads scheduled here are wired.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// cgroup v2 directory the capture programs attach to [default: the cgroup2 mount]
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub pin_dir: PathBuf,
    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Admin endpoint (`/certs`, `/healthz/ready`); keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Seconds to let proxied connections finish on shutdown.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout_secs: f64,
    /// Seconds to wait for an upstream connect.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Milliseconds between checks of the config file.
    #[arg(long, default_value_t = 500)]
    pub reload_interval_ms: u64,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Root CA certificate (PEM); with --ca-key. Without them the agent uses (or creates) a root
    /// under --state-dir.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Root CA private key (PEM); with --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// More trusted roots (PEM bundle), for root rotation.
    #[arg(long)]
    pub extra_roots: Option<PathBuf>,
    /// Where the agent keeps a generated CA (created 0700, key 0600).
    #[arg(long, default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Lifetime of workload certificates in seconds; renewed at half-life.
    #[arg(long, default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The mesh config file holding workloads and policies.
    #[arg(long)]
    pub config: PathBuf,
    /// Source: a workload (`name` in `default`, or `namespace/name`) or an IP.
    #[arg(long)]
    pub from: String,
    /// Destination: `<workload or IP>:<port>`.
    #[arg(long)]
    pub to: String,
    /// Treat the connection as plaintext even if the source is enrolled.
    #[arg(long)]
    pub plaintext: bool,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Print the pinned eBPF maps (works while the agent runs and after it stopped or crashed).
    Maps(MapsArgs),
}

#[derive(Debug, clap::Args)]
pub struct MapsArgs {
    /// Only this map (ENROLLED, SOCK_DST, ORIG_DST, EXCL_PORTS).
    pub name: Option<String>,
    /// bpffs directory where the agent pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub pin_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}
