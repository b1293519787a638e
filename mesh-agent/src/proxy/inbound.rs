//! Inbound HBONE: the in-pod listener on 15008.
//!
//! TLS 1.3 with the pod's own certificate, a client certificate required and verified against the
//! trust bundle and trust domain; then HTTP/2 `CONNECT` streams, each checked against this pod and
//! relayed to the application inside the pod's network namespace. A bad peer gets a clean
//! rejection and a log line naming the reason; the listener keeps serving everyone else.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

use super::accounting::{failed, Accounting};
use super::hbone::{serve_connection, InboundRequest};
use super::labels::Ends;
use super::outbound::connect_as;
use super::relay::{relay, Transferred};
use super::{PodContext, Proxy};
use crate::identity::{peer_identity, Identity};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts HBONE connections until the task is aborted.
pub async fn serve_inbound(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    let tls = tokio_rustls::TlsAcceptor::from(proxy.certs.server_config(&pod.identity));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let guard = proxy.tracker.track();
                let (pod, proxy, tls) = (pod.clone(), proxy.clone(), tls.clone());
                tokio::spawn(async move {
                    connection(stream, peer, tls, pod, proxy).await;
                    drop(guard);
                });
            }
            Err(e) => {
                tracing::warn!(pod = %pod.workload.key(), error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
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
    let reject = |reason: &'static str, error: String| {
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
        failed(&proxy.metrics, ends.labels(), reason);
        tracing::warn!(pod = %pod_key, %peer, %reason, %error, "rejected inbound HBONE connection");
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return reject("tls_handshake", format!("TLS handshake failed: {e}")),
        Err(_) => return reject("tls_handshake", "TLS handshake timed out".into()),
    };
    let peer_id = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(id) => Arc::new(id),
        Err(e) => return reject("peer_identity", e.to_string()),
    };
    let settings = proxy.h2.clone();
    let (pod2, proxy2, id2) = (pod.clone(), proxy.clone(), peer_id.clone());
    let served = serve_connection(tls, &settings, move |req| {
        let (pod, proxy, peer_id) = (pod2.clone(), proxy2.clone(), id2.clone());
        async move { handle_stream(req, peer, &peer_id, &pod, &proxy).await }
    })
    .await;
    if let Err(e) = served {
        tracing::debug!(pod = %pod_key, %peer, peer_identity = %peer_id, error = %e, "HBONE connection ended with an error");
    }
}

/// One CONNECT stream: check it, connect to the application, relay.
async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    peer_id: &Identity,
    pod: &PodContext,
    proxy: &Proxy,
) {
    let state = proxy.state.borrow().clone();
    let src = state.workload_by_ip(peer.ip()).cloned();
    let ends = Ends {
        reporter: "destination",
        src: src.as_deref(),
        src_identity: Some(peer_id),
        dst: Some(&pod.workload),
        dst_identity: Some(&pod.identity),
        service: None,
        mtls: true,
    };
    let labels = ends.labels();
    let pod_key = pod.workload.key();
    let refuse = |req: InboundRequest, status: StatusCode, reason: &'static str, error: String| {
        failed(&proxy.metrics, labels.clone(), reason);
        tracing::warn!(pod = %pod_key, %peer, peer_identity = %peer_id, status = status.as_u16(), %error, "rejected CONNECT");
        req.reject(status);
    };
    let target = match req.target() {
        Ok(t) => t,
        Err(e) => return refuse(req, StatusCode::BAD_REQUEST, "bad_request", e),
    };
    if !pod.workload.ips.contains(&target.ip().to_canonical()) {
        let error = format!("CONNECT target {target} is not this pod ({})", pod_key);
        return refuse(req, StatusCode::BAD_REQUEST, "wrong_destination", error);
    }
    let mut app = match connect_as(&pod.netns, peer.ip(), target, proxy.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                req,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_connect",
                e.to_string(),
            )
        }
    };
    let mut tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(pod = %pod_key, %peer, error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    let accounting = Accounting::open(proxy.metrics.clone(), labels);
    let (transferred, error) = match relay(&mut tunnel, &mut app).await {
        Ok(t) => (t, None),
        Err(e) => (Transferred::default(), Some(e.to_string())),
    };
    let duration = accounting.close(transferred);
    tracing::info!(
        dst_workload = %pod_key,
        src_addr = %peer,
        src_workload = %src.as_ref().map_or_else(|| "-".to_string(), |w| w.key()),
        src_principal = %peer_id,
        dst = %target,
        bytes_received = transferred.client_to_server,
        bytes_sent = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        security = %"mutual_tls",
        error = %error.as_deref().unwrap_or("-"),
        "inbound connection complete"
    );
}
