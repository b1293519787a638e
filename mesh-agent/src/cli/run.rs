//! `mesh-agent run`: wires config -> state -> {datapath, in-pod listeners, proxy} and shuts down
//! cleanly on SIGTERM/SIGINT.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use std::os::fd::{AsFd, BorrowedFd};

use super::{AfterHandover, RunArgs};
use crate::config::kubernetes::{self, KubeOptions};
use crate::config::{self, watch_file};
use crate::datapath::{check_adoptable, default_cgroup_root, Datapath, DatapathConfig};
use crate::handover::{self, Endpoint, Handed, Role, Successor};
use crate::identity::{ca_secret, read_extra_roots, CertManager, CertificateAuthority};
use crate::inpod::{InpodManager, NetnsFinder};
use crate::model::Mesh;
use crate::proxy::{Proxy, ProxyOptions};
use crate::state::State;
use crate::telemetry::{admin, carry, Metrics, Readiness, ResultLabels};

/// How often workloads that could not be wired (their netns does not exist yet, say) are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Where workloads, services and policies come from.
enum Source {
    /// The YAML file and the bytes read at start.
    File(PathBuf, Vec<u8>),
    Kubernetes(kube::Client),
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    let (source, config) = match &args.config {
        Some(path) => {
            let text = std::fs::read(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let config = config::parse(path, &String::from_utf8_lossy(&text))?;
            (Source::File(path.clone(), text), config)
        }
        // Empty until the watchers' first full sync; not ready meanwhile.
        None => (
            Source::Kubernetes({
                kube_options(&args).check()?;
                kube_client(args.kubeconfig.as_deref()).await?
            }),
            Mesh {
                excluded_ports: args.excluded_ports.clone(),
                root_namespace: args.root_namespace.clone(),
                waypoint_only_default: args.waypoint_only_default,
                ..Mesh::default()
            },
        ),
    };

    let ca = load_ca(&args, &source).await?;
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        args.ca.trust_domain.clone(),
        Duration::from_secs(args.ca.cert_lifetime_secs),
    );

    let file_mode = matches!(source, Source::File(..));
    let (config_tx, mut config_rx) = watch::channel(Arc::new(config));
    // Kubernetes mode: the watchers start now. When an agent already runs here, its sockets
    // are taken over only after the first full sync: before it this agent would have no pod
    // to wire, and a handed socket would wait with nobody accepting.
    let (config_tx, kube_watcher) = match &source {
        Source::File(..) => (Some(config_tx), None),
        Source::Kubernetes(client) => {
            tracing::info!(node = %args.node, "Kubernetes mode: watching the API server");
            let (synced_tx, _) = watch::channel(false);
            let task = tokio::spawn(kubernetes::run(
                client.clone(),
                kube_options(&args),
                config_tx,
                synced_tx,
            ));
            (None, Some(task))
        }
    };
    let mut synced = file_mode;
    if !file_mode && handover::running(&args.pin_dir) {
        tracing::info!("an agent runs on this node: taking over after the first full sync");
        if config_rx.changed().await.is_err() {
            anyhow::bail!("the Kubernetes watchers stopped before their first full sync");
        }
        tracing::info!("first full sync with the API server done");
        synced = true;
    }
    let config = config_rx.borrow_and_update().clone();

    // An agent already running on this pin directory hands its sockets over and drains (a
    // hitless upgrade); everything that can fail without the kernel has been done by now, and
    // the maps it pinned are checked to be ones this version can take over: an incompatible
    // upgrade stops here, with the old agent still serving.
    check_adoptable(&args.pin_dir)?;
    let mut handed = match handover::take_over(&args.pin_dir) {
        Err(e @ handover::HandoverError::Peer { .. }) => {
            // Abstract socket names have no permissions: anyone in the node's network
            // namespace can hold the name. Not an agent of ours: start as if none ran.
            tracing::warn!(error = %e, "ignoring the handover socket's holder");
            None
        }
        other => other?,
    };
    if let Some(h) = &handed {
        tracing::info!(
            predecessor = h.predecessor,
            "took the listening sockets over from the running agent; it drains and exits"
        );
    }
    // Bind the endpoints before touching the kernel, so a port clash fails without side effects.
    let metrics_listener = endpoint(&mut handed, Role::Metrics, args.metrics_addr).await?;
    let readiness_listener = endpoint(&mut handed, Role::Readiness, args.readiness_addr).await?;
    let admin_listener = endpoint(&mut handed, Role::Admin, args.admin_addr).await?;
    let endpoint_sockets = [
        (
            Role::Metrics,
            metrics_listener.as_fd().try_clone_to_owned()?,
        ),
        (
            Role::Readiness,
            readiness_listener.as_fd().try_clone_to_owned()?,
        ),
        (Role::Admin, admin_listener.as_fd().try_clone_to_owned()?),
    ];

    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => default_cgroup_root()?,
    };
    let datapath = Arc::new(Datapath::load(&DatapathConfig {
        cgroup_root: cgroup_root.clone(),
        pin_dir: args.pin_dir.clone(),
        excluded_ports: config.excluded_ports.clone(),
    })?);

    if let Some(log) = datapath.take_log() {
        tokio::spawn(crate::datapath::log::forward(log));
    }
    let metrics = Arc::new(Metrics::new());
    let events_from = Arc::downgrade(&datapath);
    metrics.set_datapath_events(Box::new(move || {
        events_from
            .upgrade()
            .and_then(|dp| dp.event_counts().ok())
            .unwrap_or_default()
    }));
    if let Some(h) = handed.as_mut() {
        carry_counters(&metrics, h);
    }
    let initial = State::from_mesh(&config, &args.node);
    log_policy_warnings(&initial);
    let (state_tx, state_rx) = watch::channel(Arc::new(initial));
    let proxy = Arc::new(Proxy::new(
        &ProxyOptions {
            trust_domain: args.ca.trust_domain.clone(),
            connect_timeout: Duration::from_secs_f64(args.connect_timeout_secs),
            handshake_timeout: Duration::from_secs_f64(args.handshake_timeout_secs),
            max_handshakes_per_source: args.max_handshakes_per_source,
            max_handshakes: args.max_handshakes,
            max_connections_per_pod: args.max_connections_per_pod,
            max_connections: args.max_connections,
        },
        state_rx,
        Some(datapath.orig_dst()),
        metrics.clone(),
        certs,
    ));
    let readiness = Arc::new(Readiness::default());
    let ejected_from = Arc::downgrade(&proxy);
    let ejected: admin::EjectedSource = Arc::new(move || {
        ejected_from
            .upgrade()
            .map_or(serde_json::Value::Array(Vec::new()), |p| {
                p.ejected_endpoints()
            })
    });
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
            admin::admin_routes(proxy.certs.clone(), readiness.clone(), ejected),
        )),
    ];
    let tracker = proxy.tracker.clone();
    let mut inpod = InpodManager::new(
        datapath.clone(),
        proxy.clone(),
        NetnsFinder::new(args.pods.netns_dir.clone(), args.pods.proc_dir.clone()),
    )
    .with_sysctl_dir(args.pods.sysctl_dir.clone())
    .with_handed(handed.map(|mut h| h.take(Role::Pod)).unwrap_or_default());

    // File mode is complete from the start; Kubernetes mode once every watcher has listed.
    // File mode: ready once every listed workload is wired (one that cannot be is a mistake to
    // surface). Kubernetes mode: once synced; one user's pod that cannot be wired must not hold
    // back the node's agent, and with it a DaemonSet rollout (it is logged and counted in
    // `mesh_workloads_pending`).
    let wait_for_every_pod = file_mode;
    let watcher = match source {
        Source::File(path, text) => {
            let reload_metrics = metrics.clone();
            tokio::spawn(watch_file(
                path,
                Duration::from_millis(args.reload_interval_ms),
                text,
                config_tx.expect("kept in file mode"),
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
            ))
        }
        Source::Kubernetes(_) => kube_watcher.expect("started above in Kubernetes mode"),
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut pending = apply(
        &mut inpod,
        &state_tx,
        &readiness,
        &metrics,
        synced,
        wait_for_every_pod,
    )
    .await;
    // Counts the configurations put in force; logged once each is fully applied (state swapped,
    // pods reconciled, live connections re-evaluated), so operators and tests can tell when an
    // edit took effect.
    let mut generation: u64 = 1;
    applied(&metrics, generation);
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    // Without the endpoint this agent still serves; it only cannot hand over to a successor.
    let (mut successors, handover_task) = match bind_handover(&args.pin_dir).await {
        Ok(endpoint) => endpoint.serve(),
        Err(e) => {
            tracing::error!(error = %e, "no handover endpoint: a new agent will not be able to take over without a gap");
            let (_tx, rx) = tokio::sync::mpsc::channel(1);
            (rx, tokio::spawn(async {}))
        }
    };
    let stop = loop {
        tokio::select! {
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break Stop::Shutdown("config watcher stopped");
                }
                let config = config_rx.borrow_and_update().clone();
                if !synced {
                    synced = true;
                    tracing::info!("first full sync with the API server done");
                }
                let state = State::from_mesh(&config, &args.node);
                if state.excluded_ports != state_tx.borrow().excluded_ports {
                    match datapath.set_excluded_ports(&state.excluded_ports) {
                        Ok(()) => tracing::info!(ports = ?state.excluded_ports, "excluded ports updated"),
                        Err(e) => tracing::error!(error = %e, "cannot update the excluded ports"),
                    }
                }
                // Once per change, not on every rebuild (a busy cluster rebuilds often).
                if state.policy_warnings != state_tx.borrow().policy_warnings {
                    log_policy_warnings(&state);
                }
                state_tx.send_replace(Arc::new(state));
                pending = apply(&mut inpod, &state_tx, &readiness, &metrics, synced, wait_for_every_pod).await;
                generation += 1;
                applied(&metrics, generation);
            }
            _ = retry.tick() => {
                // A wired pod whose namespace vanished (sandbox restarted) is unwired here and
                // found again by the next reconcile; one stat per wired pod per tick.
                if !pending.is_empty() || inpod.prune_vanished() > 0 {
                    pending = apply(&mut inpod, &state_tx, &readiness, &metrics, synced, wait_for_every_pod).await;
                }
            }
            Some(successor) = successors.recv() => {
                let sockets: Vec<(Role, BorrowedFd)> = endpoint_sockets
                    .iter()
                    .map(|(role, fd)| (*role, fd.as_fd()))
                    .chain(inpod.listening_sockets().map(|fd| (Role::Pod, fd)))
                    .collect();
                match successor.send_sockets(&sockets) {
                    Ok(()) => break Stop::Handover(successor),
                    Err(e) => tracing::error!(
                        successor = successor.pid(),
                        error = %e,
                        "handover failed; this agent keeps serving"
                    ),
                }
            }
            _ = sigterm.recv() => break Stop::Shutdown("SIGTERM"),
            _ = sigint.recv() => break Stop::Shutdown("SIGINT"),
        }
    };

    handover_task.abort();
    // A successor that asked meanwhile gets a closed connection, not a wait.
    drop(successors);
    readiness.set(false, BTreeSet::new());
    inpod.stop_accepting();
    proxy.drain.start();
    // Whatever ended the loop, the next agent may start now, while this one drains: the
    // endpoints, the link descriptors and the pin directory lock go (the pins keep every
    // program attached).
    admin_tasks.iter().for_each(|t| t.abort());
    drop(endpoint_sockets);
    datapath.hand_over();
    let successor = match stop {
        Stop::Shutdown(name) => {
            tracing::info!(
                signal = name,
                live_connections = tracker.live(),
                "shutting down: no new connections, draining"
            );
            None
        }
        Stop::Handover(successor) => {
            // The successor holds every listening socket now; ours closed, theirs stay open.
            let pid = successor.pid();
            match successor.released(&metrics.encode()) {
                Ok(()) => tracing::info!(
                    successor = pid,
                    live_connections = tracker.live(),
                    "handed over to the new agent: no new connections, draining"
                ),
                Err(e) => tracing::error!(
                    successor = pid,
                    error = %e,
                    "cannot tell the new agent the handover is complete; draining"
                ),
            }
            Some(successor)
        }
    };
    // The config source keeps being followed while draining: a policy edit still closes the
    // live connections it now denies. Nothing else is applied (no pod is wired or unwired).
    let drained = tracker.drain(Duration::from_secs_f64(args.drain_timeout_secs));
    tokio::pin!(drained);
    let left = loop {
        tokio::select! {
            left = &mut drained => break left,
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break (&mut drained).await;
                }
                let config = config_rx.borrow_and_update().clone();
                state_tx.send_replace(Arc::new(State::from_mesh(&config, &args.node)));
                proxy.reevaluate();
            }
        }
    };
    watcher.abort();
    if left > 0 {
        for conn in tracker.list() {
            tracing::warn!(
                pod = %conn.workload.key(),
                listener = %conn.listener,
                peer = %conn.peer,
                age_secs = conn.since.elapsed().as_secs(),
                "drain deadline passed; closing connection"
            );
        }
        tracker.cut_all();
        // The cut tasks go at their next poll, counting their connections closed on the way.
        tracker.drain(Duration::from_secs(1)).await;
    }
    let handed_over = successor.is_some();
    if let Some(successor) = successor {
        let pid = successor.pid();
        if let Err(e) = successor.drained(&metrics.encode()) {
            tracing::warn!(successor = pid, error = %e, "cannot report the end of the drain to the new agent");
        }
    }
    // Fail closed: the programs, maps and in-pod routes stay. Until the next agent takes them
    // over, enrolled pods' connections are refused and plaintext to them is dropped, instead of
    // leaving the mesh. `mesh-agent uninstall` removes the mesh from the node.
    drop(inpod);
    drop(datapath);
    if handed_over {
        if args.after_handover == AfterHandover::Wait {
            tracing::info!("handed over and drained; waiting for SIGTERM");
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
        }
        tracing::info!("stopped after handing over to the new agent");
    } else {
        tracing::info!(
            "stopped; the datapath stays attached and enrolled pods fail closed until the next \
             agent takes over (`mesh-agent uninstall` removes it)"
        );
    }
    Ok(())
}

/// Continues the counters of the agent handed over from: what it counted until the handover now,
/// what it counts while it drains once it is done (on a thread of its own: that can take the
/// whole drain timeout, and must not hold up this agent's exit).
fn carry_counters(metrics: &Arc<Metrics>, handed: &mut Handed) {
    let first = carry::parse_counters(&handed.counters).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the previous agent's counters are not carried over");
        Default::default()
    });
    let added = metrics.add_counters(&first);
    tracing::info!(
        samples = added,
        "carried the previous agent's counters over"
    );
    let Some(watch) = handed.drain_watch() else {
        return;
    };
    let metrics = metrics.clone();
    std::thread::spawn(
        move || match watch.wait().map(|t| carry::parse_counters(&t)) {
            Ok(Ok(last)) => {
                let added = metrics.add_counters(&carry::difference(&first, &last));
                tracing::info!(
                    samples = added,
                    "the previous agent finished draining; its last counts carried over"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the previous agent's last counts are not carried over")
            }
            Err(e) => {
                tracing::warn!(error = %e, "what the previous agent counted while draining is not carried over")
            }
        },
    );
}

/// Why the main loop ended.
enum Stop {
    /// A signal, or the config source ended.
    Shutdown(&'static str),
    /// A new agent took the listening sockets over.
    Handover(Successor),
}

/// The handover endpoint. Right after a handover the previous agent may still hold the name
/// for a moment (it closes it as it stops): retried for a few seconds.
async fn bind_handover(pin_dir: &Path) -> anyhow::Result<Endpoint> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Endpoint::bind(pin_dir) {
            Ok(endpoint) => return Ok(endpoint),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "handover socket busy; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// An admin endpoint's listener: the one the previous agent handed over, else a new one.
async fn endpoint(
    handed: &mut Option<Handed>,
    role: Role,
    addr: std::net::SocketAddr,
) -> anyhow::Result<TcpListener> {
    if let Some(listener) = handed.as_mut().and_then(|h| h.listener(role, addr)) {
        listener.set_nonblocking(true)?;
        return Ok(TcpListener::from_std(listener)?);
    }
    let what = match role {
        Role::Metrics => "metrics",
        Role::Readiness => "readiness",
        Role::Admin | Role::Pod => "admin",
    };
    bind(addr, what).await
}

/// Once the state is complete (after every reconcile), removes what the datapath holds for pods
/// that are neither wired nor waiting to be: a previous agent's pods no longer enrolled, and
/// stale entries of pods wired again in a new namespace.
fn prune(inpod: &InpodManager, state: &State, synced: bool) {
    if !synced {
        return;
    }
    match inpod.prune_adopted(state) {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => tracing::info!(
            ?removed,
            "removed capture entries of workloads that are no longer enrolled here"
        ),
        Err(e) => tracing::error!(error = %e, "cannot remove stale capture entries"),
    }
}

async fn apply(
    inpod: &mut InpodManager,
    state: &watch::Sender<Arc<State>>,
    readiness: &Readiness,
    metrics: &Metrics,
    synced: bool,
    wait_for_every_pod: bool,
) -> BTreeSet<String> {
    let snapshot = state.borrow().clone();
    let pending = inpod.reconcile(&snapshot).await;
    // What the datapath holds for pods neither wired nor waiting to be (a previous agent's) goes
    // once the state is complete.
    prune(inpod, &snapshot, synced);
    if synced {
        inpod.close_unclaimed_handed();
    }
    inpod.reevaluate_policy();
    metrics.workloads_enrolled.set(inpod.wired() as i64);
    metrics.workloads_pending.set(pending.len() as i64);
    let blocking = if wait_for_every_pod {
        pending.clone()
    } else {
        BTreeSet::new()
    };
    readiness.set(synced, blocking);
    pending
}

/// Reports that configuration `generation` is in force.
fn applied(metrics: &Metrics, generation: u64) {
    metrics.config_generation.set(generation as i64);
    tracing::info!(generation, "configuration applied");
}

fn kube_options(args: &RunArgs) -> KubeOptions {
    KubeOptions {
        node: args.node.clone(),
        root_namespace: args.root_namespace.clone(),
        excluded_ports: args.excluded_ports.clone(),
        route_status_for: None,
        waypoint_only_default: args.waypoint_only_default,
    }
}

/// A client for the API server: `--kubeconfig` if given, else `$KUBECONFIG` / `~/.kube/config`,
/// else in-cluster (the pod's ServiceAccount token), as kubectl.
pub(super) async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API server configured: not in a pod with a ServiceAccount token \
             (is automountServiceAccountToken off?) and no $KUBECONFIG; or pass --kubeconfig",
        )?,
    };
    tracing::info!(server = %config.cluster_url, "Kubernetes API server");
    kube::Client::try_from(config).context("cannot build a Kubernetes API client")
}

/// The mesh CA: `--ca-cert`/`--ca-key` when those files exist (the mounted Secret); in Kubernetes
/// mode with `--create-ca-secret`, otherwise the Secret read (or created) through the API; else a
/// root under `--state-dir`.
async fn load_ca(args: &RunArgs, source: &Source) -> anyhow::Result<CertificateAuthority> {
    let files_present = args.ca.files_present();
    if let (Source::Kubernetes(client), Some(secret), false) =
        (source, &args.create_ca_secret, files_present)
    {
        let (namespace, name) = ca_secret::parse_secret_name(secret)?;
        tracing::info!(
            secret = %secret,
            "CA files not mounted (yet); reading the CA Secret through the API"
        );
        let extra = read_extra_roots(args.ca.extra_roots.as_deref())?;
        return Ok(ca_secret::load_or_create(
            client.clone(),
            &namespace,
            &name,
            &args.ca.trust_domain,
            extra,
        )
        .await?);
    }
    Ok(CertificateAuthority::load_or_generate(
        &args.ca.ca_options(),
    )?)
}

/// Every proxied connection holds several sockets and every pod a few listeners: lift the soft
/// open-file limit to the hard one (a 1,024 default would stop the agent at a few hundred pods).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::warn!(soft, "cannot raise the open-file limit");
        }
    }
}

/// What the policy model could not take as written (L7 fields, DISABLE, conflicts), and
/// services marked waypoint-only that guard nothing.
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
