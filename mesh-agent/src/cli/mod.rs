//! Command line: `run` (the node agent), `waypoint`, `inspect` (read pinned state) and the tools.
pub mod ebpf_log;
pub mod explain;
pub mod inspect;
pub mod run;
pub mod uninstall;
pub mod waypoint;

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
    /// Removes the mesh from this node: detaches every program, removes every pin and the
    /// in-pod routes and sysctls of the pods the agent had enrolled. Run it with no agent
    /// running (the agent leaves everything attached when it stops, so pods fail closed).
    Uninstall(UninstallArgs),
    /// Switches the eBPF programs' debug log (their decisions, in the running agent's log as
    /// lines starting `ebpf DEBUG:`) on or off, or shows whether it is on. Off at every agent
    /// start.
    EbpfLog(EbpfLogArgs),
    /// Run as a waypoint inside its own pod: the L7 proxy the node agents send the traffic of
    /// services (or workloads) labelled `istio.io/use-waypoint` to.
    Waypoint(Box<waypoint::WaypointArgs>),
}

#[derive(Debug, clap::Args)]
pub struct EbpfLogArgs {
    #[arg(value_enum)]
    pub switch: EbpfLogSwitch,
    /// Where the agent pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfLogSwitch {
    On,
    Off,
    Status,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Where the agent pinned its maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub pin_dir: PathBuf,
    /// Where the enrolled pods are found (by their addresses), to remove their in-pod routes.
    #[command(flatten)]
    pub pods: PodDirs,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The mesh config file (file mode); watched for changes.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: workloads, services and policies come from the API server (in-cluster
    /// service account, or --kubeconfig / $KUBECONFIG).
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig file for Kubernetes mode outside a cluster [default: in-cluster, then $KUBECONFIG]
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: Istio's root namespace (its policies apply mesh-wide).
    #[arg(long, default_value = "istio-system", requires = "kubernetes")]
    pub root_namespace: String,
    /// Kubernetes mode: destination ports never redirected (comma-separated, e.g. 22,10250).
    #[arg(long, value_delimiter = ',', requires = "kubernetes")]
    pub excluded_ports: Vec<u16>,
    /// Kubernetes mode: no bypass by default. The endpoints of every Service with a waypoint
    /// accept its target ports only from that waypoint, unless the Service (or its namespace) is
    /// labelled `mesh.dev/waypoint-only: "false"`.
    #[arg(long, requires = "kubernetes")]
    pub waypoint_only_default: bool,
    /// Kubernetes mode: when --ca-cert/--ca-key do not exist (the Secret is not mounted yet), read
    /// the CA from this Secret (`NAMESPACE/NAME`, Istio's `cacerts` layout) through the API, and
    /// create it with a generated root if it does not exist.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "kubernetes")]
    pub create_ca_secret: Option<String>,
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
    /// Seconds to let proxied connections finish after a shutdown signal or a handover to a new
    /// agent; what is still open then is closed, each with a log line.
    #[arg(long, default_value_t = 300.0)]
    pub drain_timeout_secs: f64,
    /// What the agent does once it handed over to a new agent and drained: `exit`, or `wait`
    /// for SIGTERM (in a DaemonSet, so the kubelet does not restart the old version).
    #[arg(long, value_enum, default_value_t = AfterHandover::Exit)]
    pub after_handover: AfterHandover,
    /// Seconds an inbound HBONE (15008) client has to finish its TLS handshake.
    #[arg(long, default_value_t = 10.0)]
    pub handshake_timeout_secs: f64,
    /// Inbound TLS handshakes in progress allowed from one source address; more are closed at
    /// once (`mesh_inbound_handshakes_rejected_total`), so one slow or hostile peer cannot starve
    /// the others.
    #[arg(long, default_value_t = crate::proxy::admission::DEFAULT_PER_SOURCE)]
    pub max_handshakes_per_source: usize,
    /// Inbound TLS handshakes in progress allowed on the node.
    #[arg(long, default_value_t = crate::proxy::admission::DEFAULT_TOTAL)]
    pub max_handshakes: usize,
    /// Concurrent connections allowed on the node (all pods, all listeners); past it a new
    /// connection is reset at accept and counted (`mesh_connections_shed_total`).
    #[arg(long, default_value_t = crate::proxy::admission::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Concurrent connections allowed through one pod's listeners.
    #[arg(long, default_value_t = crate::proxy::admission::DEFAULT_MAX_CONNECTIONS_PER_POD)]
    pub max_connections_per_pod: usize,
    /// Seconds to wait for an upstream connect.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Milliseconds between checks of the config file.
    #[arg(long, default_value_t = 500)]
    pub reload_interval_ms: u64,
    #[command(flatten)]
    pub ca: CaArgs,
    #[command(flatten)]
    pub pods: PodDirs,
}

/// The mesh CA and the certificates made with it (`run` and `waypoint`).
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Root CA certificate (PEM); with --ca-key (in Kubernetes, the mounted CA Secret). Without
    /// them: the CA Secret read through the API (Kubernetes mode, `--create-ca-secret` or
    /// `--ca-secret`), else the root under --state-dir (which the node agent creates when
    /// missing; a waypoint never creates one).
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Root CA private key (PEM); with --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// More trusted roots (PEM bundle), for root rotation.
    #[arg(long)]
    pub extra_roots: Option<PathBuf>,
    /// Where a generated CA is kept (created 0700, key 0600).
    #[arg(long, default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Lifetime of workload certificates in seconds; renewed at half-life.
    #[arg(long, default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
}

impl CaArgs {
    /// Whether --ca-cert and --ca-key are given and both files exist (the Secret is mounted).
    pub fn files_present(&self) -> bool {
        self.ca_cert.as_ref().is_some_and(|p| p.exists())
            && self.ca_key.as_ref().is_some_and(|p| p.exists())
    }

    pub fn ca_options(&self) -> crate::identity::CaOptions {
        crate::identity::CaOptions {
            ca_cert: self.ca_cert.clone(),
            ca_key: self.ca_key.clone(),
            state_dir: self.state_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            extra_roots: self.extra_roots.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AfterHandover {
    Exit,
    Wait,
}

/// Where the node's pods and their sysctls are found (`run` and `uninstall`).
#[derive(Debug, clap::Args)]
pub struct PodDirs {
    /// Directory of bind-mounted network namespaces (`ip netns`, containerd, CRI-O), searched for
    /// the namespace of a workload that does not name one (found by its IP).
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    /// The host's procfs: `<dir>/<pid>/ns/net` of every process is searched too (in a container
    /// this needs hostPID: true).
    #[arg(long, default_value = "/proc")]
    pub proc_dir: PathBuf,
    /// Where the node's `/proc/sys` is visible: the in-pod sysctls (tcp_fwmark_accept,
    /// fwmark_reflect) are written below it from inside each pod's namespace. In a container,
    /// whose own /proc/sys is read-only, mount the node's /proc/sys/net and point here.
    #[arg(long, default_value = "/proc/sys")]
    pub sysctl_dir: PathBuf,
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
    /// HTTP method of the request. Any of --method, --path, --host, --header evaluates one HTTP
    /// request as a waypoint would, L7 fields included [default then: GET]
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path as on the request line, query included [default then: /]
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP Host (`:authority`) [default then: a Host header, else --to as written]
    #[arg(long)]
    pub host: Option<String>,
    /// An HTTP request header `NAME:VALUE`; repeat for more.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
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
