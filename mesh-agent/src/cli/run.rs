//! `mesh-agent run`: wires config -> state -> {datapath, in-pod listeners, proxy} and shuts down
//! cleanly on SIGTERM/SIGINT.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::RunArgs;
use crate::config::{watch_file, Config};
use crate::datapath::{default_cgroup_root, Datapath, DatapathConfig};
use crate::identity::{CaOptions, CertManager, CertificateAuthority};
use crate::inpod::InpodManager;
use crate::proxy::hbone::{H2Settings, HbonePool};
use crate::proxy::{ConnTracker, Proxy};
use crate::state::State;
use crate::telemetry::{admin, Metrics, Readiness, ResultLabels};

/// How often workloads that could not be wired (their netns does not exist yet, say) are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    let text = std::fs::read(&args.config)
        .with_context(|| format!("cannot read config file {}", args.config.display()))?;
    let config = Config::parse(&args.config, &String::from_utf8_lossy(&text))?;

    let ca = CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: args.ca_cert.clone(),
        ca_key: args.ca_key.clone(),
        state_dir: args.state_dir.clone(),
        trust_domain: args.trust_domain.clone(),
        extra_roots: args.extra_roots.clone(),
    })?;
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        args.trust_domain.clone(),
        Duration::from_secs(args.cert_lifetime_secs),
    );

    // Bind the endpoints before touching the kernel, so a port clash fails without side effects.
    let metrics_listener = bind(args.metrics_addr, "metrics").await?;
    let readiness_listener = bind(args.readiness_addr, "readiness").await?;
    let admin_listener = bind(args.admin_addr, "admin").await?;

    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => default_cgroup_root()?,
    };
    let datapath = Arc::new(Datapath::load(&DatapathConfig {
        cgroup_root: cgroup_root.clone(),
        pin_dir: args.pin_dir.clone(),
        excluded_ports: config.excluded_ports.clone(),
    })?);

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let admin_tasks = [
        tokio::spawn(admin::serve(
            metrics_listener,
            admin::metrics_routes(metrics.clone()),
        )),
        tokio::spawn(admin::serve(
            readiness_listener,
            admin::readiness_routes(readiness.clone()),
        )),
        tokio::spawn(admin::serve(
            admin_listener,
            admin::admin_routes(certs.clone(), readiness.clone()),
        )),
    ];

    let initial = State::from_config(&config, &args.node);
    log_policy_warnings(&initial);
    let (state_tx, state_rx) = watch::channel(Arc::new(initial));
    let tracker = ConnTracker::default();
    let proxy = Arc::new(Proxy {
        state: state_rx,
        orig_dst: datapath.orig_dst(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        connect_timeout: Duration::from_secs_f64(args.connect_timeout_secs),
        certs,
        trust_domain: args.trust_domain.clone(),
        pool: HbonePool::new(H2Settings::default()),
        h2: H2Settings::default(),
        balancer: Default::default(),
        live: Default::default(),
    });
    let mut inpod = InpodManager::new(datapath.clone(), proxy.clone());

    let (config_tx, mut config_rx) = watch::channel(Arc::new(config));
    let reload_metrics = metrics.clone();
    let watcher = tokio::spawn(watch_file(
        args.config.clone(),
        Duration::from_millis(args.reload_interval_ms),
        text,
        config_tx,
        move |result| match result {
            Ok(_) => {
                reload_metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "applied" })
                    .inc();
                tracing::info!("config file changed; applying it");
            }
            Err(e) => {
                reload_metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "rejected" })
                    .inc();
                tracing::error!(
                    "rejected config edit, the previous configuration stays in force: {e}"
                );
            }
        },
    ));

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut pending = apply(&mut inpod, &state_tx, &readiness, &metrics);
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let signal_name = loop {
        tokio::select! {
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break "config watcher stopped";
                }
                let config = config_rx.borrow_and_update().clone();
                let state = State::from_config(&config, &args.node);
                if state.excluded_ports != state_tx.borrow().excluded_ports {
                    match datapath.set_excluded_ports(&state.excluded_ports) {
                        Ok(()) => tracing::info!(ports = ?state.excluded_ports, "excluded ports updated"),
                        Err(e) => tracing::error!(error = %e, "cannot update the excluded ports"),
                    }
                }
                log_policy_warnings(&state);
                state_tx.send_replace(Arc::new(state));
                pending = apply(&mut inpod, &state_tx, &readiness, &metrics);
            }
            _ = retry.tick(), if !pending.is_empty() => {
                pending = apply(&mut inpod, &state_tx, &readiness, &metrics);
            }
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };

    tracing::info!(
        signal = signal_name,
        live_connections = tracker.live(),
        "shutting down: no new connections, draining"
    );
    watcher.abort();
    readiness.set(false, BTreeSet::new());
    inpod.stop_accepting();
    let left = tracker
        .drain(Duration::from_secs_f64(args.drain_timeout_secs))
        .await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout passed; closing the remaining connections"
        );
    }
    inpod.unwire_all();
    drop(inpod);
    admin_tasks.iter().for_each(|t| t.abort());
    let datapath = Arc::try_unwrap(datapath)
        .map_err(|_| anyhow::anyhow!("internal error: the datapath is still shared at shutdown"))?;
    datapath.shutdown()?;
    tracing::info!("detached and unpinned everything; bye");
    Ok(())
}

fn apply(
    inpod: &mut InpodManager,
    state: &watch::Sender<Arc<State>>,
    readiness: &Readiness,
    metrics: &Metrics,
) -> BTreeSet<String> {
    let snapshot = state.borrow().clone();
    let pending = inpod.reconcile(&snapshot);
    inpod.reevaluate_policy();
    metrics.workloads_enrolled.set(inpod.wired() as i64);
    readiness.set(true, pending.clone());
    pending
}

/// Every proxied connection holds several sockets and every pod a few listeners: lift the soft
/// open-file limit to the hard one (a 1,024 default would stop the agent at a few hundred pods).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(soft = limit.rlim_cur, "cannot raise the open-file limit");
            }
        }
    }
}

/// What the policy model could not take as written (L7 fields, DISABLE, conflicts).
fn log_policy_warnings(state: &State) {
    for warning in &state.policy_warnings {
        tracing::warn!(%warning, "policy");
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what} endpoint (is another agent running?)")
    })
}
