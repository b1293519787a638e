//! Accept: the first step of every listener. A connection is admitted against the concurrent-
//! connection caps (or reset and counted), tracked for the shutdown drain, and handed to the
//! listener's handler in a task of its own.
//!
//! A listener knows only its [`Local`] end: the workload it acts for, that workload's identity,
//! the network namespace its sockets live in (none for a proxy that runs inside it, such as a
//! waypoint) and its share of the connection cap. Nothing here knows about pods.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::admission::{ConnLimiter, LocalConns};
use super::{ConnInfo, Proxy};
use crate::identity::Identity;
use crate::model::Workload;
use crate::net::Netns;
use crate::telemetry::{AcceptErrorLabels, LogEvery};

/// The end of the connections a listener serves.
pub struct Local {
    /// The workload it acts for: the source of outbound connections, the destination of inbound
    /// ones.
    pub workload: Arc<Workload>,
    /// The identity it presents (inbound) and sends with (outbound).
    pub identity: Identity,
    /// Where its sockets, upstream ones included, are created; `None` for the agent's own
    /// network namespace.
    pub netns: Option<Arc<Netns>>,
    /// Its connections in progress, for its share of the connection cap.
    pub conns: Arc<LocalConns>,
}

/// The accept-time guard rails every listener shares.
pub struct Admission {
    /// Caps on concurrent connections (per local workload and in all).
    pub connections: Arc<ConnLimiter>,
    /// Shed connections are logged at most every 10 s.
    shed_logged: LogEvery,
    /// Failed accepts are logged at most every 10 s (they can come in thousands).
    accept_errors_logged: LogEvery,
}

impl Admission {
    pub fn new(connections: ConnLimiter) -> Admission {
        Admission {
            connections: Arc::new(connections),
            shed_logged: LogEvery::new(Duration::from_secs(10)),
            accept_errors_logged: LogEvery::new(Duration::from_secs(10)),
        }
    }
}

/// Accepts connections on one listener until the task is aborted; each runs `handle` in its own
/// task, counted for the shutdown drain. `on_shed` runs for a connection over a cap before it is
/// reset.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
    on_shed: fn(&Proxy, &Local, SocketAddr),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Local>, Arc<Proxy>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admission = &proxy.admission;
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: the connection stays in the listen
                // backlog. Count it, say so now and then, and back off instead of spinning.
                let reason = accept_error_reason(&e);
                proxy
                    .metrics
                    .accept_errors
                    .get_or_create(&AcceptErrorLabels {
                        listener: what,
                        reason,
                    })
                    .inc();
                if admission.accept_errors_logged.ready() {
                    log_accept_error(&local.workload.key(), what, reason, &e);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        backoff = MIN_ACCEPT_BACKOFF;
        let permit = match admission.connections.admit(&local.conns) {
            Ok(permit) => permit,
            Err(shed) => {
                proxy
                    .metrics
                    .connections_shed
                    .get_or_create(&AcceptErrorLabels {
                        listener: what,
                        reason: shed.reason(),
                    })
                    .inc();
                if admission.shed_logged.ready() {
                    tracing::warn!(
                        workload = %local.workload.key(),
                        listener = what,
                        reason = %shed.reason(),
                        node_connections = admission.connections.active(),
                        workload_connections = local.conns.active(),
                        "connection shed: over the concurrent-connection cap (reset; counted in \
                         mesh_connections_shed_total; logged at most every 10 s)"
                    );
                }
                on_shed(&proxy, &local, peer);
                crate::net::reset(stream);
                continue;
            }
        };
        let guard = proxy.tracker.track(ConnInfo {
            workload: local.workload.clone(),
            listener: what,
            peer,
            since: Instant::now(),
        });
        let conn = handle(stream, peer, local.clone(), proxy.clone());
        super::budget::assert_future_size(what, &conn);
        let id = guard.id();
        let task = tokio::spawn(async move {
            conn.await;
            drop(guard);
            drop(permit);
        });
        proxy.tracker.set_task(id, task.abort_handle());
    }
}

/// Pause after a failed accept, doubling while failures go on.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The `reason` label of a failed accept.
fn accept_error_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "process_file_limit",
        Some(libc::ENFILE) => "system_file_limit",
        Some(libc::ENOBUFS | libc::ENOMEM) => "out_of_memory",
        _ => "other",
    }
}

fn log_accept_error(workload: &str, listener: &str, reason: &str, e: &std::io::Error) {
    if reason == "process_file_limit" {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(0, |(soft, _)| soft);
        tracing::error!(
            %workload,
            %listener,
            limit,
            "cannot accept connections: the agent is out of file descriptors; new connections \
             wait in the listen backlog until some close (raise the agent's open-file limit, \
             e.g. LimitNOFILE or ulimit -n; counted in mesh_accept_errors_total; logged at most \
             every 10 s)"
        );
    } else {
        tracing::error!(%workload, %listener, reason, error = %e, "accept failed; retrying (counted in mesh_accept_errors_total; logged at most every 10 s)");
    }
}
