//! The inbound stack: [`Authorize`] decides an inbound connection under the current policy, then
//! [`ConnectApp`] connects to the application as the client (the client's address preserved).
//! Both inbound listeners (HBONE and plaintext) run every connection through it; what they do
//! with the answer (accept a CONNECT, or relay the plain socket) is theirs.
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{ready, Either, Ready};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use super::accept::Local;
use super::budget::{boxed, BoxFuture};
use super::live::ConnFacts;
use super::ProxyError;
use crate::net;
use crate::policy::{Decision, Reason};
use crate::state::State;
use crate::telemetry::{DenialLabels, Metrics};

/// An inbound connection for the local workload, as policy sees it.
pub struct Inbound {
    pub local: Arc<Local>,
    pub facts: ConnFacts,
    /// The client's socket address (the application sees it as the source).
    pub peer: SocketAddr,
}

/// An authorized inbound connection with its application socket open.
pub struct Admitted {
    pub conn: Inbound,
    pub app: TcpStream,
}

/// The policy step in front of `inner`: no bypass, then the AuthorizationPolicies
/// ([`State::decide_inbound`]). A denial is logged (one line with source, destination, port and
/// the deciding rule or the guarded service) and counted in `mesh_policy_denials_total`.
#[derive(Clone)]
pub struct Authorize<S> {
    state: watch::Receiver<Arc<State>>,
    metrics: Arc<Metrics>,
    inner: S,
}

impl<S> Authorize<S> {
    pub fn new(state: watch::Receiver<Arc<State>>, metrics: Arc<Metrics>, inner: S) -> Self {
        Authorize {
            state,
            metrics,
            inner,
        }
    }

    fn decide(&self, conn: &Inbound) -> Result<(), Decision> {
        let state = self.state.borrow().clone();
        let Some(decision) = conn.facts.decide(&state) else {
            return Ok(());
        };
        if decision.is_allowed() {
            return Ok(());
        }
        let (facts, workload) = (&conn.facts, &conn.local.workload);
        self.metrics
            .policy_denials
            .get_or_create(&DenialLabels {
                destination_workload: workload.name.clone(),
                destination_workload_namespace: workload.namespace.clone(),
                reason: decision.reason.metric_label(),
                policy: decision.reason.deciding_rule().unwrap_or_default(),
            })
            .inc();
        let src_principal = facts
            .src
            .as_ref()
            .map_or_else(|| "-".to_string(), |i| i.to_string());
        let dst = SocketAddr::new(facts.dst_ip, facts.dst_port);
        if let Reason::WaypointOnly { .. } = decision.reason {
            tracing::warn!(src = %facts.src_ip, %src_principal, %dst, dst_workload = %facts.workload, reason = %decision.reason, "connection refused: it bypasses the service's waypoint");
        } else {
            tracing::warn!(src = %facts.src_ip, %src_principal, %dst, dst_workload = %facts.workload, reason = %decision.reason, "connection denied by policy");
        }
        Err(decision)
    }
}

impl<S> Service<Inbound> for Authorize<S>
where
    S: Service<Inbound, Error = ProxyError> + Clone,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<Ready<Result<S::Response, ProxyError>>, Oneshot<S, Inbound>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // A decision needs nothing that can run out; the next step is made ready per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Inbound) -> Self::Future {
        match self.decide(&conn) {
            Ok(()) => Either::Right(self.inner.clone().oneshot(conn)),
            Err(decision) => {
                let error = match decision.reason {
                    Reason::WaypointOnly { .. } => {
                        ProxyError::WaypointBypass(decision.reason.to_string())
                    }
                    _ => ProxyError::PolicyDenied(decision.reason.to_string()),
                };
                Either::Left(ready(Err(error)))
            }
        }
    }
}

/// Connects to the application inside the local workload's network namespace, from the client's
/// address.
#[derive(Clone)]
pub struct ConnectApp {
    timeout: Duration,
}

impl ConnectApp {
    pub fn new(timeout: Duration) -> ConnectApp {
        ConnectApp { timeout }
    }
}

impl Service<Inbound> for ConnectApp {
    type Response = Admitted;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Admitted, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: Inbound) -> Self::Future {
        let timeout = self.timeout;
        boxed("connect to the application", async move {
            let target = SocketAddr::new(conn.facts.dst_ip, conn.facts.dst_port);
            let netns = conn.local.netns.as_deref();
            match net::connect_transparent(netns, conn.peer.ip(), target, timeout).await {
                Ok(app) => Ok(Admitted { conn, app }),
                Err(error) => Err(ProxyError::UpstreamConnect { dst: target, error }),
            }
        })
    }
}
