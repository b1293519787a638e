//! The proxy: outbound capture (15001), inbound HBONE (15008) and plaintext (15006).
//!
//! Every listener runs the same steps, each a unit of its own: [`accept`] (admission, tracking),
//! then a stack of tower `Service`s — outbound: [`resolve`] then [`connect`]; inbound:
//! [`authorize`] then connect to the application — and finally the relay with its accounting.
//! A listener knows only its [`Local`] end (workload, identity, optional network namespace), so
//! a proxy that is not a pod's composes the same steps: a waypoint's listener ([`waypoint`])
//! takes CONNECTs for the destinations it fronts and runs them through the outbound stack.
mod accept;
mod accounting;
pub mod admission;
mod authorize;
mod budget;
mod connect;
mod detect;
mod error;
pub mod hbone;
mod inbound;
mod labels;
mod live;
mod outbound;
mod plaintext;
mod relay;
pub mod resolve;
mod tracker;
mod waypoint;

pub use accept::Local;
pub use budget::BoxFuture;
pub use connect::{Connected, Upstream};
pub use detect::{Detected, Rewind};
pub use error::{Failure, ProxyError};
pub use inbound::serve_inbound;
pub use labels::{app as workload_app, CLUSTER_NAME};
pub use live::LiveConns;
pub use outbound::serve_outbound;
pub use plaintext::serve_plaintext;
pub use resolve::Routed;
pub use tracker::{ConnInfo, ConnTracker, Drain};
pub use waypoint::{
    authorize_client, decide_at_waypoint, denied, serve_waypoint, HttpHandler, HttpStream,
    WaypointVerdict,
};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::datapath::OrigDstTable;
use crate::identity::{CertManager, Identity};
use crate::model::Workload;
use crate::state::State;
use crate::telemetry::Metrics;
use accept::Admission;
use admission::{ConnLimiter, HandshakeLimiter};
use authorize::{Authorize, ConnectApp};
use connect::Connect;
use hbone::{H2Settings, HbonePool};
use resolve::{Balancer, Resolve};

/// The proxy's settings, from the command line.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub trust_domain: String,
    /// Deadline of an upstream TCP connect (an HBONE CONNECT gets twice as long).
    pub connect_timeout: Duration,
    /// How long an inbound HBONE client may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
    pub max_handshakes_per_source: usize,
    pub max_handshakes: usize,
    pub max_connections_per_pod: usize,
    pub max_connections: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            trust_domain: "cluster.local".into(),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes_per_source: admission::DEFAULT_PER_SOURCE,
            max_handshakes: admission::DEFAULT_TOTAL,
            max_connections_per_pod: admission::DEFAULT_MAX_CONNECTIONS_PER_POD,
            max_connections: admission::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Everything a connection needs, shared by all listeners of the node: the state, the steps of
/// each stack, and what the agent itself drives (drain, certificates).
pub struct Proxy {
    state: watch::Receiver<Arc<State>>,
    metrics: Arc<Metrics>,
    /// Live connections, for the shutdown drain.
    pub tracker: ConnTracker,
    /// Set when the agent stops accepting: HBONE connections wind down.
    pub drain: Drain,
    /// Certificates of the local workloads.
    pub certs: Arc<CertManager>,
    trust_domain: String,
    admission: Admission,
    /// Where the connect hooks record original destinations; `None` for a proxy that captures
    /// nothing (its outbound listeners then refuse every connection).
    orig_dst: Option<OrigDstTable>,
    /// The outbound stack: resolve, then connect.
    outbound: Resolve<Connect>,
    /// The inbound stack: authorize, then connect to the application.
    inbound: Authorize<ConnectApp>,
    /// Caps on inbound TLS handshakes in progress (per source and in all).
    handshakes: Arc<HandshakeLimiter>,
    handshake_timeout: Duration,
    h2: H2Settings,
    /// Inbound connections policy may revoke.
    live: LiveConns,
}

impl Proxy {
    pub fn new(
        options: &ProxyOptions,
        state: watch::Receiver<Arc<State>>,
        orig_dst: Option<OrigDstTable>,
        metrics: Arc<Metrics>,
        certs: Arc<CertManager>,
    ) -> Proxy {
        let h2 = H2Settings::default();
        let connect = Connect::new(
            certs.clone(),
            HbonePool::new(h2.clone()),
            options.connect_timeout,
            metrics.clone(),
        );
        let balancer = Arc::new(Balancer::default());
        Proxy {
            outbound: Resolve::new(
                state.clone(),
                balancer,
                &options.trust_domain,
                metrics.clone(),
                connect,
            ),
            inbound: Authorize::new(
                state.clone(),
                metrics.clone(),
                ConnectApp::new(options.connect_timeout),
            ),
            state,
            metrics,
            tracker: ConnTracker::default(),
            drain: Drain::default(),
            certs,
            trust_domain: options.trust_domain.clone(),
            admission: Admission::new(ConnLimiter::new(
                options.max_connections_per_pod,
                options.max_connections,
            )),
            orig_dst,
            handshakes: Arc::new(HandshakeLimiter::new(
                options.max_handshakes_per_source,
                options.max_handshakes,
            )),
            handshake_timeout: options.handshake_timeout,
            h2,
            live: LiveConns::default(),
        }
    }

    /// Closes live inbound connections the current policy denies and forgets balancing state of
    /// services that are gone; called after every change.
    pub fn reevaluate(&self) {
        let state = self.state.borrow().clone();
        self.outbound.balancer().prune(&state);
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

    /// A connection from `local` to `target` through the outbound stack (resolved, then opened):
    /// what a waypoint's HTTP side uses to reach an endpoint with its own identity.
    pub async fn connect_upstream(
        &self,
        local: &Arc<Local>,
        peer: std::net::SocketAddr,
        target: std::net::SocketAddr,
    ) -> Result<Connected, Failure> {
        use tower::ServiceExt;
        let orig = resolve::Target {
            local: local.clone(),
            orig: target,
            peer,
        };
        self.outbound.clone().oneshot(orig).await
    }

    /// Like [`connect_upstream`](Self::connect_upstream) to a service VIP and port, but to the
    /// service's endpoint `endpoint`, which the caller chose (a waypoint balancing per
    /// request): the connection keeps the service's labels and identity checks.
    pub async fn connect_upstream_endpoint(
        &self,
        local: &Arc<Local>,
        peer: std::net::SocketAddr,
        target: std::net::SocketAddr,
        endpoint: &Workload,
    ) -> Result<Connected, Failure> {
        let orig = resolve::Target {
            local: local.clone(),
            orig: target,
            peer,
        };
        self.outbound.call_endpoint(orig, endpoint).await
    }

    /// The current state.
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// Service endpoints ejected from the load balancing now, as JSON: service, endpoint and
    /// the seconds left.
    pub fn ejected_endpoints(&self) -> serde_json::Value {
        self.outbound
            .balancer()
            .ejected()
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "service": e.service,
                    "endpoint": e.endpoint,
                    "remaining_seconds": e.remaining.as_secs_f64(),
                })
            })
            .collect()
    }

    /// Inbound connections a policy change could revoke, open now.
    pub fn live_connections(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests;
