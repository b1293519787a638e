//! `mesh-agent waypoint`: the same binary as a waypoint, run inside the waypoint's own pod (no
//! eBPF, no capture). It serves HBONE on 15008 with the identity of its pod's service account,
//! takes the CONNECTs the node agents send it for the services and workloads that use it, and
//! carries each to an endpoint over HBONE with that same identity.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::CaArgs;
use crate::config::kubernetes::{self, KubeOptions};
use crate::config::{self, watch_file};
use crate::identity::{ca_secret, read_extra_roots, CertManager, CertificateAuthority, Identity};
use crate::model::waypoint::GATEWAY_NAME_LABEL;
use crate::model::{Mesh, Workload};
use crate::proxy::{serve_waypoint, Local, Proxy, ProxyOptions};
use crate::state::State;
use crate::telemetry::{admin, Metrics};

#[derive(Debug, clap::Args)]
pub struct WaypointArgs {
    /// The mesh config file (file mode), the same the node agents read; watched for changes.
    /// Without it: Kubernetes mode (in-cluster, or --kubeconfig / $KUBECONFIG), which also
    /// writes the status of the HTTPRoutes attached to this waypoint.
    #[arg(long, conflicts_with_all = ["kubeconfig", "ca_secret"])]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: kubeconfig file outside a cluster [default: in-cluster, then $KUBECONFIG]
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: when --ca-cert/--ca-key do not exist (the Secret is not mounted), read
    /// the mesh CA from this Secret (`NAMESPACE/NAME`) through the API; never created here.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub ca_secret: Option<String>,
    /// Kubernetes mode: Istio's root namespace (its policies apply mesh-wide).
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// Kubernetes mode: this pod's node (`spec.nodeName`).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node: String,
    /// The waypoint's Gateway (`name`, in --namespace).
    #[arg(long, env = "GATEWAY_NAME")]
    pub name: String,
    /// The Gateway's namespace (also this pod's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This pod's workload name (it must carry
    /// `gateway.networking.k8s.io/gateway-name: <--name>` and run as service account <--name>).
    #[arg(long, env = "POD_NAME")]
    pub pod: String,
    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Seconds to let tunnels finish after SIGTERM.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout_secs: f64,
    /// Seconds to wait for an upstream connect.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Milliseconds between checks of the config file.
    #[arg(long, default_value_t = 500)]
    pub reload_interval_ms: u64,
    /// One line per HTTP request on standard output: `text` (Envoy-like), `json` (one object
    /// per line) or `off`.
    #[arg(long, value_enum, default_value = "text")]
    pub access_log: crate::waypoint::access_log::Format,
    /// Threads that serve requests. 1 (the default) runs every task of the waypoint on one
    /// thread: the least CPU and latency per request, up to one CPU of load; scale out with
    /// replicas, or raise this to use more CPUs in one pod.
    #[arg(long, env = "MESH_WAYPOINT_WORKERS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    #[command(flatten)]
    pub ca: CaArgs,
}

/// This waypoint and its pod in a Mesh, or what is missing.
fn find_self(mesh: &Mesh, args: &WaypointArgs) -> Result<(State, Arc<Workload>), String> {
    let state = State::from_mesh(mesh, "");
    let waypoint_key = format!("{}/{}", args.namespace, args.name);
    let Some(waypoint) = mesh.waypoints.iter().find(|w| w.key() == waypoint_key) else {
        return Err(format!("no Gateway {waypoint_key} of class istio-waypoint"));
    };
    let pod_key = format!("{}/{}", args.namespace, args.pod);
    let Some(pod) = state.workloads.get(&pod_key).cloned() else {
        return Err(format!("no workload {pod_key} (this pod, --pod)"));
    };
    if !waypoint.has_pod(&pod) {
        return Err(format!(
            "workload {pod_key} is not a pod of waypoint {waypoint_key}: it needs the label \
             {GATEWAY_NAME_LABEL}: {name} and service account {name}",
            name = args.name
        ));
    }
    Ok((state, pod))
}

pub async fn waypoint(args: WaypointArgs) -> anyhow::Result<()> {
    let waypoint_key = format!("{}/{}", args.namespace, args.name);
    let pod_key = format!("{}/{}", args.namespace, args.pod);
    let (config_tx, mut config_rx) = watch::channel(Arc::new(Mesh::default()));
    let (watcher, client) = match &args.config {
        Some(path) => {
            let text = std::fs::read(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let mesh = config::parse(path, &String::from_utf8_lossy(&text))?;
            if let Err(e) = find_self(&mesh, &args) {
                bail!("{}: {e}", path.display());
            }
            config_tx.send_replace(Arc::new(mesh));
            config_rx.borrow_and_update();
            let watcher = tokio::spawn(watch_file(
                path.clone(),
                Duration::from_millis(args.reload_interval_ms),
                text,
                config_tx,
                |result| match result {
                    Ok(_) => tracing::info!("config file changed; applying it"),
                    Err(e) => {
                        tracing::error!(error = %e, "rejected config edit; keeping the last good one")
                    }
                },
            ));
            (watcher, None)
        }
        None => {
            let opts = KubeOptions {
                node: args.node.clone(),
                root_namespace: args.root_namespace.clone(),
                excluded_ports: Vec::new(),
                route_status_for: Some(waypoint_key.clone()),
                // No bypass is enforced by the endpoints' agents, never by the waypoint.
                waypoint_only_default: false,
            };
            opts.check()?;
            let client = super::run::kube_client(args.kubeconfig.as_deref()).await?;
            tracing::info!(waypoint = %waypoint_key, "Kubernetes mode: watching the API server");
            let (synced_tx, _) = watch::channel(false);
            let watcher = tokio::spawn(kubernetes::run(client.clone(), opts, config_tx, synced_tx));
            // Until the watchers list this Gateway and this pod (Running, with its IP).
            let mut last = String::new();
            loop {
                if config_rx.changed().await.is_err() {
                    bail!("the Kubernetes watchers stopped");
                }
                let mesh = config_rx.borrow_and_update().clone();
                match find_self(&mesh, &args) {
                    Ok(_) => break,
                    Err(e) if e != last => {
                        tracing::info!("waiting for the API to list this waypoint: {e}");
                        last = e;
                    }
                    Err(_) => {}
                }
            }
            (watcher, Some(client))
        }
    };
    let mesh = config_rx.borrow().clone();
    let (state, pod) = find_self(&mesh, &args).map_err(anyhow::Error::msg)?;

    let ca = load_ca(&args, client.as_ref()).await?;
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        args.ca.trust_domain.clone(),
        Duration::from_secs(args.ca.cert_lifetime_secs),
    );
    let identity = Identity::new(&args.ca.trust_domain, &pod.namespace, &pod.service_account);
    certs
        .acquire(&identity)
        .await
        .with_context(|| format!("no certificate for {identity}"))?;

    let metrics = Arc::new(Metrics::new());
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", args.metrics_addr))?;
    let admin = tokio::spawn(admin::serve(
        metrics_listener,
        admin::metrics_routes(metrics.clone()),
    ));

    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let proxy = Arc::new(Proxy::new(
        &ProxyOptions {
            trust_domain: args.ca.trust_domain.clone(),
            connect_timeout: Duration::from_secs_f64(args.connect_timeout_secs),
            ..ProxyOptions::default()
        },
        state_rx,
        None,
        metrics.clone(),
        certs,
    ));
    let local = Arc::new(Local {
        workload: pod,
        identity: identity.clone(),
        netns: None,
        conns: Arc::default(),
    });
    let telemetry = crate::waypoint::telemetry::Telemetry::new(&metrics, args.access_log);
    let http: Arc<dyn crate::proxy::HttpHandler> =
        crate::waypoint::http::Http::new(proxy.clone(), waypoint_key.clone(), telemetry);
    let mut listeners = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    ] {
        let addr = SocketAddr::new(ip, mesh_common::HBONE_PORT);
        match crate::net::listen(None, addr) {
            Ok(l) => listeners.push(tokio::spawn(serve_waypoint(
                l,
                local.clone(),
                proxy.clone(),
                http.clone(),
            ))),
            Err(e) if ip.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {}
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }

    let access_log = tokio::spawn(crate::waypoint::access_log::flush_periodically());
    tracing::info!(waypoint = %waypoint_key, pod = %pod_key, %identity, "waypoint ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let mesh = config_rx.borrow_and_update().clone();
                // Built off the runtime: on one worker thread (the default) requests would wait
                // for it.
                let state = tokio::task::spawn_blocking(move || State::from_mesh(&mesh, ""))
                    .await
                    .context("building the state of a new configuration")?;
                state_tx.send_replace(Arc::new(state));
                proxy.reevaluate();
                tracing::info!("configuration applied");
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("shutting down: no new connections; draining");
    listeners.iter().for_each(tokio::task::JoinHandle::abort);
    proxy.drain.start();
    let tracker = proxy.tracker.clone();
    let left = tracker
        .drain(Duration::from_secs_f64(args.drain_timeout_secs))
        .await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline passed; closing the rest"
        );
        tracker.cut_all();
    }
    watcher.abort();
    admin.abort();
    // What is left is written at exit, once the runtime is down (`access_log::flush_blocking`).
    access_log.abort();
    Ok(())
}

/// The agents' CA, never a new one: a waypoint with a CA of its own would be trusted by nobody.
/// (It still holds the signing key, as the agents do, until certificates come from a CA
/// service.) The mounted files, else (Kubernetes mode, `--ca-secret`) the Secret through the
/// API, else the agents' root under --state-dir.
async fn load_ca(
    args: &WaypointArgs,
    client: Option<&kube::Client>,
) -> anyhow::Result<CertificateAuthority> {
    if let (Some(client), Some(secret), false) = (client, &args.ca_secret, args.ca.files_present())
    {
        let (namespace, name) = ca_secret::parse_secret_name(secret)?;
        let extra = read_extra_roots(args.ca.extra_roots.as_deref())?;
        return Ok(ca_secret::load(
            client.clone(),
            &namespace,
            &name,
            &args.ca.trust_domain,
            extra,
        )
        .await?);
    }
    let generated = args.ca.state_dir.join("ca-cert.pem");
    if args.ca.ca_cert.is_none() && !generated.exists() {
        bail!(
            "no mesh CA: neither --ca-cert/--ca-key, --ca-secret (Kubernetes mode) nor {} (a \
             waypoint uses the agents' CA and never creates one)",
            generated.display()
        );
    }
    Ok(CertificateAuthority::load_or_generate(
        &args.ca.ca_options(),
    )?)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn workers(extra: &[&str]) -> Result<u16, String> {
        let base = ["mesh-agent", "waypoint", "--name", "wp", "--pod", "wp-1"];
        let args = base.iter().chain(extra);
        match Cli::try_parse_from(args)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Waypoint(args) => Ok(args.workers),
            _ => unreachable!("the waypoint command"),
        }
    }

    #[test]
    fn a_waypoint_runs_on_one_thread_unless_told_otherwise() {
        if std::env::var_os("MESH_WAYPOINT_WORKERS").is_none() {
            assert_eq!(workers(&[]), Ok(1));
        }
        assert_eq!(workers(&["--workers", "4"]), Ok(4));
        let zero = workers(&["--workers", "0"]).unwrap_err();
        assert!(zero.contains("--workers") && zero.contains('0'), "{zero}");
    }
}
