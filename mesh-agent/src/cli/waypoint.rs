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

use crate::config::{self, watch_file};
use crate::identity::{CaOptions, CertManager, CertificateAuthority, Identity};
use crate::model::waypoint::GATEWAY_NAME_LABEL;
use crate::proxy::{serve_waypoint, Local, Proxy, ProxyOptions};
use crate::state::State;
use crate::telemetry::{admin, Metrics};

#[derive(Debug, clap::Args)]
pub struct WaypointArgs {
    /// The mesh config file (file mode), the same the node agents read; watched for changes.
    #[arg(long)]
    pub config: PathBuf,
    /// The waypoint's Gateway (`name`, in --namespace).
    #[arg(long)]
    pub name: String,
    /// The Gateway's namespace (also this pod's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This pod's workload name in the config (it must carry
    /// `gateway.networking.k8s.io/gateway-name: <--name>`).
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
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Root CA certificate (PEM); with --ca-key. Without them the agents' CA under --state-dir
    /// is used; the waypoint never creates one.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Root CA private key (PEM); with --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Where a generated CA is kept.
    #[arg(long, default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Lifetime of the waypoint's certificate in seconds; renewed at half-life.
    #[arg(long, default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
    /// One line per HTTP request on standard output: `text` (Envoy-like), `json` (one object
    /// per line) or `off`.
    #[arg(long, value_enum, default_value = "text")]
    pub access_log: crate::waypoint::access_log::Format,
}

pub async fn waypoint(args: WaypointArgs) -> anyhow::Result<()> {
    let text = std::fs::read(&args.config)
        .with_context(|| format!("cannot read config file {}", args.config.display()))?;
    let mesh = config::parse(&args.config, &String::from_utf8_lossy(&text))?;
    let state = State::from_mesh(&mesh, "");
    let waypoint_key = format!("{}/{}", args.namespace, args.name);
    if !state.waypoints().any(|w| w.waypoint.key() == waypoint_key) {
        bail!(
            "{}: no Gateway {waypoint_key} of class istio-waypoint",
            args.config.display()
        );
    }
    let pod_key = format!("{}/{}", args.namespace, args.pod);
    let Some(pod) = state.workloads.get(&pod_key).cloned() else {
        bail!(
            "{}: no workload {pod_key} (this pod, --pod)",
            args.config.display()
        );
    };
    if pod.labels.get(GATEWAY_NAME_LABEL) != Some(&args.name) {
        bail!(
            "workload {pod_key} is not a pod of waypoint {waypoint_key}: it needs the label \
             {GATEWAY_NAME_LABEL}: {}",
            args.name
        );
    }

    // The agents' CA, never a new one: a waypoint with a CA of its own would be trusted by
    // nobody. (It still holds the signing key, as the agents do, until certificates come from a
    // CA service.)
    let generated = args.state_dir.join("ca-cert.pem");
    if args.ca_cert.is_none() && !generated.exists() {
        bail!(
            "no mesh CA: neither --ca-cert/--ca-key nor {} (a waypoint uses the agents' CA and \
             never creates one)",
            generated.display()
        );
    }
    let ca = CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: args.ca_cert.clone(),
        ca_key: args.ca_key.clone(),
        state_dir: args.state_dir.clone(),
        trust_domain: args.trust_domain.clone(),
        extra_roots: None,
    })?;
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        args.trust_domain.clone(),
        Duration::from_secs(args.cert_lifetime_secs),
    );
    let identity = Identity::new(&args.trust_domain, &pod.namespace, &pod.service_account);
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
            trust_domain: args.trust_domain.clone(),
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
        crate::waypoint::http::Http::new(proxy.clone(), telemetry);
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

    let (config_tx, mut config_rx) = watch::channel(Arc::new(mesh));
    let watcher = tokio::spawn(watch_file(
        args.config.clone(),
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
                state_tx.send_replace(Arc::new(State::from_mesh(&mesh, "")));
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
    Ok(())
}
