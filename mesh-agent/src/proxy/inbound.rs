//! Inbound HBONE: the in-pod listener on 15008.
//!
//! TLS 1.3 with the pod's own certificate, a client certificate required and verified against the
//! trust bundle and trust domain; then HTTP/2 `CONNECT` streams, each checked against this pod and
//! relayed to the application inside the pod's network namespace. A bad peer gets a clean
//! rejection and a log line naming the reason; the listener keeps serving everyone else.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::accounting::{failed, Accounting};
use super::hbone::{serve_connection_until, InboundRequest};
use super::labels::Ends;
use super::live::ConnFacts;
use super::relay::relay;
use super::{PodContext, Proxy, ProxyError};
use crate::identity::{peer_identity, Identity};
use crate::net;
use crate::policy::Decision;
use crate::telemetry::{DenialLabels, ReasonLabels};

/// Accepts HBONE connections until the task is aborted.
pub async fn serve_inbound(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    let tls = tokio_rustls::TlsAcceptor::from(proxy.certs.server_config(&pod.identity));
    super::accept_loop(
        listener,
        pod,
        proxy,
        "inbound HBONE",
        |_, _, _| {},
        move |stream, peer, pod, proxy| connection(stream, peer, tls.clone(), pod, proxy),
    )
    .await
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    let _ = stream.set_nodelay(true);
    let pod_key = pod.workload.key();
    let reject = |error: ProxyError| {
        let state = proxy.state.borrow().clone();
        let ends = Ends {
            reporter: "destination",
            src: state.workload_by_ip(peer.ip()).map(Arc::as_ref),
            src_identity: None,
            dst: Some(&pod.workload),
            dst_identity: Some(&pod.identity),
            service: None,
            mtls: true,
        };
        failed(&proxy.metrics, ends.labels(), error.reason());
        tracing::warn!(pod = %pod_key, %peer, reason = %error.reason(), %error, "rejected inbound HBONE connection");
    };
    let permit = match proxy.handshakes.admit(peer.ip()) {
        Ok(permit) => permit,
        Err(refusal) => {
            proxy
                .metrics
                .handshakes_rejected
                .get_or_create(&ReasonLabels {
                    reason: refusal.reason(),
                })
                .inc();
            if proxy.handshakes.should_log() {
                tracing::warn!(pod = %pod_key, %peer, reason = refusal.reason(), "refusing inbound HBONE connections: too many TLS handshakes in progress (counted in mesh_inbound_handshakes_rejected_total; logged at most every 10 s)");
            }
            // Closed at once with a reset: nothing was read, nothing is owed.
            return net::reset(stream);
        }
    };
    let accepted = tokio::time::timeout(proxy.handshake_timeout, tls.accept(stream)).await;
    drop(permit);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return reject(ProxyError::TlsHandshake(e)),
        Err(_) => return reject(ProxyError::TlsHandshakeTimeout(proxy.handshake_timeout)),
    };
    let peer_id = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(id) => Arc::new(id),
        Err(e) => return reject(ProxyError::PeerIdentity(e.to_string())),
    };
    let settings = proxy.h2.clone();
    let (pod2, proxy2, id2) = (pod.clone(), proxy.clone(), peer_id.clone());
    // When the agent drains (shutdown, or a new agent took over), the connection says GOAWAY:
    // its streams finish here, the peer opens new ones elsewhere.
    let drain = proxy.drain.started();
    let served = serve_connection_until(
        tls,
        &settings,
        move |req| {
            let (pod, proxy, peer_id) = (pod2.clone(), proxy2.clone(), id2.clone());
            async move { handle_stream(req, peer, &peer_id, &pod, &proxy).await }
        },
        drain,
    )
    .await;
    if let Err(e) = served {
        tracing::debug!(pod = %pod_key, %peer, peer_identity = %peer_id, error = %e, "HBONE connection ended with an error");
    }
}

/// One CONNECT stream: check it, authorize it, connect to the application, relay.
async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    peer_id: &Identity,
    pod: &PodContext,
    proxy: &Proxy,
) {
    let pod_key = pod.workload.key();
    let refuse = |req: InboundRequest, error: ProxyError| {
        let labels = destination_labels(proxy, pod, peer, Some(peer_id));
        failed(&proxy.metrics, labels, error.reason());
        let status = error.status();
        tracing::warn!(pod = %pod_key, %peer, peer_identity = %peer_id, status = status.as_u16(), reason = %error.reason(), %error, "rejected CONNECT");
        req.reject(status);
    };
    let target = match req.target() {
        Ok(t) => t,
        Err(e) => return refuse(req, ProxyError::BadRequest(e)),
    };
    if !pod.workload.ips.contains(&target.ip().to_canonical()) {
        let pod = pod_key.clone();
        return refuse(req, ProxyError::WrongDestination { target, pod });
    }
    let facts = ConnFacts {
        workload: pod_key.clone(),
        dst_ip: target.ip().to_canonical(),
        dst_port: target.port(),
        src_ip: peer.ip().to_canonical(),
        src: Some(peer_id.clone()),
    };
    if let Err(decision) = authorize(proxy, pod, &facts) {
        return refuse(req, ProxyError::PolicyDenied(decision.reason.to_string()));
    }
    let app =
        match net::connect_transparent(Some(&pod.netns), peer.ip(), target, proxy.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(error) => return refuse(req, ProxyError::UpstreamConnect { dst: target, error }),
        };
    let tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(pod = %pod_key, %peer, error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    deliver(proxy, pod, facts, peer, tunnel, app).await;
}

/// The metric labels of an inbound connection from `peer`.
pub(super) fn destination_labels(
    proxy: &Proxy,
    pod: &PodContext,
    peer: SocketAddr,
    peer_id: Option<&Identity>,
) -> crate::telemetry::ConnLabels {
    let state = proxy.state.borrow().clone();
    Ends {
        reporter: "destination",
        src: state.workload_by_ip(peer.ip()).map(Arc::as_ref),
        src_identity: peer_id,
        dst: Some(&pod.workload),
        dst_identity: Some(&pod.identity),
        service: None,
        mtls: peer_id.is_some(),
    }
    .labels()
}

/// Evaluates the current policy for an inbound connection; a denial is logged (one line with
/// source, destination, port and the deciding rule) and counted.
pub(super) fn authorize(
    proxy: &Proxy,
    pod: &PodContext,
    facts: &ConnFacts,
) -> Result<(), Decision> {
    let state = proxy.state.borrow().clone();
    let Some(decision) = facts.decide(&state) else {
        return Ok(());
    };
    if decision.is_allowed() {
        return Ok(());
    }
    proxy
        .metrics
        .policy_denials
        .get_or_create(&DenialLabels {
            destination_workload: pod.workload.name.clone(),
            destination_workload_namespace: pod.workload.namespace.clone(),
            reason: decision.reason.metric_label(),
        })
        .inc();
    tracing::warn!(
        src = %SocketAddr::new(facts.src_ip, 0).ip(),
        src_principal = %facts.src.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
        dst = %SocketAddr::new(facts.dst_ip, facts.dst_port),
        dst_workload = %facts.workload,
        reason = %decision.reason,
        "connection denied by policy"
    );
    Err(decision)
}

/// Relays an authorized inbound connection to the application until either side ends it or a
/// policy change revokes it; counts and logs it.
pub(super) async fn deliver<D>(
    proxy: &Proxy,
    pod: &PodContext,
    facts: ConnFacts,
    peer: SocketAddr,
    mut downstream: D,
    mut app: tokio::net::TcpStream,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let labels = destination_labels(proxy, pod, peer, facts.src.as_ref());
    let live = proxy.live.register(facts.clone());
    let accounting = Accounting::open(proxy.metrics.clone(), labels);
    let error = tokio::select! {
        result = relay(&mut downstream, &mut app, accounting.meter()) => result.err().map(|e| e.to_string()),
        () = live.revoked() => Some("closed: the policy now denies this connection".to_string()),
    };
    drop(live);
    let transferred = accounting.meter().transferred();
    let duration = accounting.close();
    let state = proxy.state.borrow().clone();
    tracing::info!(
        dst_workload = %facts.workload,
        src_addr = %peer,
        src_workload = %state.workload_by_ip(peer.ip()).map_or_else(|| "-".to_string(), |w| w.key()),
        src_principal = %facts.src.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
        dst = %SocketAddr::new(facts.dst_ip, facts.dst_port),
        bytes_received = transferred.client_to_server,
        bytes_sent = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        security = %if facts.src.is_some() { "mutual_tls" } else { "none" },
        error = %error.as_deref().unwrap_or("-"),
        "inbound connection complete"
    );
}
