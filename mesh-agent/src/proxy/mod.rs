//! The proxy: outbound capture (15001), inbound HBONE (15008), resolution and load balancing, the
//! byte relay.
mod accounting;
pub mod admission;
pub mod hbone;
mod inbound;
mod labels;
mod live;
mod outbound;
mod plaintext;
mod relay;
pub mod resolve;
mod tracker;

pub use inbound::serve_inbound;
pub use live::LiveConns;
pub use outbound::serve_outbound;
pub use plaintext::serve_plaintext;
pub use tracker::{ConnInfo, ConnTracker, Drain};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::datapath::OrigDstTable;
use crate::identity::{CertManager, Identity};
use crate::inpod::Netns;
use crate::state::{State, Workload};
use crate::telemetry::Metrics;

/// Everything a connection handler needs; shared by all pods of the node.
pub struct Proxy {
    pub state: watch::Receiver<Arc<State>>,
    pub orig_dst: OrigDstTable,
    pub metrics: Arc<Metrics>,
    pub tracker: ConnTracker,
    pub connect_timeout: Duration,
    pub certs: Arc<CertManager>,
    pub trust_domain: String,
    pub pool: hbone::HbonePool,
    pub h2: hbone::H2Settings,
    pub balancer: resolve::Balancer,
    /// Inbound connections policy may revoke.
    pub live: LiveConns,
    /// Set when the agent stops accepting: HBONE connections wind down.
    pub drain: Drain,
    /// Caps on inbound TLS handshakes in progress (per source and in all).
    pub handshakes: Arc<admission::HandshakeLimiter>,
    /// How long an inbound HBONE client may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
}

impl Proxy {
    /// Closes live inbound connections the current policy denies; called after every change.
    pub fn reevaluate(&self) {
        let state = self.state.borrow().clone();
        for (facts, decision) in self.live.reevaluate(&state) {
            tracing::warn!(
                src = %facts.src_ip,
                dst = %std::net::SocketAddr::new(facts.dst_ip, facts.dst_port),
                dst_workload = %facts.workload,
                reason = %decision.reason,
                "closing a live connection: the new policy denies it"
            );
        }
    }

    /// The SPIFFE identity of a workload in this mesh's trust domain.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
    }
}

/// The enrolled pod a listener belongs to.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub netns: Arc<Netns>,
}

/// Accepts connections on one of a pod's listeners until the task is aborted; each runs
/// `handle` in its own task, counted for the shutdown drain.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
    what: &'static str,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr, Arc<PodContext>, Arc<Proxy>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let guard = proxy.tracker.track(ConnInfo {
                    pod: pod.workload.key(),
                    listener: what,
                    peer,
                    since: std::time::Instant::now(),
                });
                let conn = handle(stream, peer, pod.clone(), proxy.clone());
                let id = guard.id();
                let task = tokio::spawn(async move {
                    conn.await;
                    drop(guard);
                });
                proxy.tracker.set_task(id, task.abort_handle());
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(pod = %pod.workload.key(), listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Socket options every proxy-owned socket carries.
pub(crate) fn mark_socket(socket: &socket2::Socket) -> std::io::Result<()> {
    socket.set_mark(mesh_common::PROXY_MARK)
}
